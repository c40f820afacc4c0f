"""FracAtlas as this project keeps it (../shared/data/fracatlas): YOLO boxes + a manifest.

Layout::

    root/images/IMGnnnnnnn.jpg
    root/labels/IMGnnnnnnn.txt    YOLO lines "0 xc yc w h" (class 0 = fracture, no
                                  classes file); empty = no fracture
    root/manifest.csv             image,label,body_part,hardware,multiscan,frontal,
                                  lateral,oblique,n_boxes,width,height,orig_width,orig_height

The manifest gives the label (`fractured` / `not_fractured`) and body part (hand, leg,
hip, shoulder, mixed); every other column is kept as text in `Sample.attributes`, so
scores can be reported on subsets (above all `hardware == "0"`: implants appear almost
only on fractured images, and a model can win by finding metal). The manifest and the
label files are cross-checked (fractured iff boxes, n_boxes = box count, every image
listed once and present) so a damaged copy fails loudly instead of training quietly
on wrong labels.

FracAtlas gives no patient identifiers: `patient` and `study` are empty, so several
views of one patient can land on both sides of a split; the split module groups
near-duplicate images to limit that, but it cannot remove it.
"""

from __future__ import annotations

from pathlib import Path

from fractured.training.datasets.base import DatasetError, Sample, SampleSet
from fractured.training.datasets.dicom_csv import read_csv_rows
from fractured.training.datasets.yolo import DEFAULT_CLASSES, parse_label_file, yolo_images

MANIFEST = "manifest.csv"
REQUIRED_COLUMNS = ("image", "label", "body_part", "hardware", "n_boxes")
_LABELS = {"fractured": 1, "not_fractured": 0}


def matches(path: Path) -> bool:
    """Whether `path` has manifest.csv, images/ and labels/."""
    return ((path / MANIFEST).is_file() and (path / "images").is_dir()
            and (path / "labels").is_dir())


def read_fracatlas(root: Path) -> SampleSet:
    """Read FracAtlas; see the module docstring for the layout and the cross-checks."""
    if not matches(root):
        raise DatasetError(f"{root}: FracAtlas needs {MANIFEST}, images/ and labels/")
    manifest = root / MANIFEST
    images_dir, labels_dir = root / "images", root / "labels"
    _, rows = read_csv_rows(manifest, REQUIRED_COLUMNS)
    on_disk = {p.relative_to(images_dir).as_posix(): p for p in yolo_images(images_dir)}
    listed: dict[str, int] = {}
    samples = []
    for line, row in rows:
        where, name = f"{manifest}:{line}", row["image"]
        if name in listed:
            raise DatasetError(f"{where}: image {name!r} is listed again (first on line "
                               f"{listed[name]})")
        listed[name] = line
        if name not in on_disk:
            raise DatasetError(f"{where}: image {name!r} is missing from {images_dir}")
        label = _LABELS.get(row["label"])
        if label is None:
            raise DatasetError(f"{where}: label {row['label']!r} is not fractured or "
                               "not_fractured")
        label_file = (labels_dir / name).with_suffix(".txt")
        boxes = parse_label_file(label_file, None) if label_file.is_file() else ()
        if bool(boxes) != bool(label):
            raise DatasetError(f"{where}: {name} is {row['label']} but {label_file} has "
                               f"{len(boxes)} box(es)")
        if row["n_boxes"] != str(len(boxes)):
            raise DatasetError(f"{where}: n_boxes is {row['n_boxes']!r} but {label_file} has "
                               f"{len(boxes)} box(es)")
        attributes = {k: v for k, v in row.items() if k not in ("image", "label", "body_part")}
        samples.append(Sample(path=on_disk[name], label=label, body_part=row["body_part"],
                              boxes=boxes, attributes=attributes))
    unlisted = sorted(set(on_disk) - set(listed))
    if unlisted:
        more = f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise DatasetError(f"{images_dir / unlisted[0]}: image is not in {manifest}{more}")
    return SampleSet("fracatlas", root, tuple(sorted(samples, key=lambda s: s.path)),
                     tuple(DEFAULT_CLASSES.values()))
