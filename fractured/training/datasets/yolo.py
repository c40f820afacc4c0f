"""YOLO (Ultralytics, Roboflow and most annotation-tool exports): a box file per image.

Layout (Ultralytics), or split folders first (Roboflow's YOLO exports)::

    root/images/[train|val|valid|test/]**/*.{jpg,jpeg,png}
    root/labels/<same relative path, .txt>    one line per object: class xc yc w h
    root/data.yaml | root/classes.txt | root/obj.names    the class names (first found)

    root/{train,valid,test}/images/**, root/{train,valid,test}/labels/**, root/data.yaml

Box lines are normalised to the image ([0, 1]), centre and size; a reader turns them
into corner boxes without opening the image. Overshoots of at most 1e-3 (rounding in
exporters) are clipped; anything else that is not a box inside the image is refused,
naming `file:line`. A missing or empty label file means the image has no objects (the
YOLO convention for background images), so label = 1 iff the image has a box: every
class counts as a finding. `data.yaml` gives `names:` as a list or an {index: name}
map; its train/val paths are not followed, the split comes from a first-level folder
under images/ (or above it, Roboflow's way) named train, val/valid/validation or
test/testing. Without any class names
only class 0 is allowed and it means "fracture". Label files without an image are
ignored, as YOLO trainers do. No patients or body parts are known.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import yaml

from fractured.training.datasets.base import BoxLabel, DatasetError, Sample, SampleSet
from fractured.training.datasets.imagefolder import split_of

YOLO_SUFFIXES = (".jpg", ".jpeg", ".png")
CLASS_FILES = ("data.yaml", "classes.txt", "obj.names")
#: The classes of a dataset that names none: class 0 is a fracture.
DEFAULT_CLASSES: Mapping[int, str] = {0: "fracture"}
_TOLERANCE = 1e-3


def matches(path: Path) -> bool:
    """Whether `path` has images/ and labels/ folders, directly or in split folders (and
    no FracAtlas manifest.csv)."""
    return (bool(_image_folders(path)) and not (path / "manifest.csv").is_file())


def _image_folders(root: Path) -> list[tuple[str | None, Path, Path]]:
    """(split, images/, labels/) pairs: root's own, else one per split folder."""
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return [(None, root / "images", root / "labels")]
    if not root.is_dir():
        return []
    return [(split_of(child.name), child / "images", child / "labels")
            for child in sorted(root.iterdir())
            if split_of(child.name) and (child / "images").is_dir()
            and (child / "labels").is_dir()]


def read_class_names(root: Path) -> dict[int, str] | None:
    """The class names from root's data.yaml, classes.txt or obj.names; None if none."""
    for name in CLASS_FILES:
        path = root / name
        if path.is_file():
            return _yaml_names(path) if name == "data.yaml" else _line_names(path)
    return None


def parse_label_file(path: Path, classes: Mapping[int, str] | None) -> tuple[BoxLabel, ...]:
    """The boxes in one YOLO label file; `classes` None means the dataset names none."""
    names = DEFAULT_CLASSES if classes is None else classes
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read as a text label file ({exc})") from exc
    boxes = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if fields:
            boxes.append(_parse_line(fields, names, f"{path}:{number}", named=classes is not None))
    return tuple(boxes)


def _parse_line(fields: list[str], names: Mapping[int, str], where: str, *,
                named: bool) -> BoxLabel:
    """One `class xc yc w h` line as a corner box; DatasetError at `where` otherwise."""
    if len(fields) != 5:
        raise DatasetError(f"{where}: expected 5 fields 'class xc yc w h', got {len(fields)}")
    try:
        index = int(fields[0])
        xc, yc, w, h = (float(field) for field in fields[1:])
    except ValueError as exc:
        raise DatasetError(f"{where}: expected an integer class and four numbers, "
                           f"got {' '.join(fields)!r}") from exc
    if not all(math.isfinite(v) for v in (xc, yc, w, h)):
        raise DatasetError(f"{where}: box values must be finite numbers")
    if index not in names:
        if not named:
            raise DatasetError(f"{where}: class {index}, but without a classes file "
                               f"({', '.join(CLASS_FILES)}) only class 0 (fracture) is allowed")
        raise DatasetError(f"{where}: class {index} is not one of the named classes "
                           f"{sorted(names)}")
    if w <= 0 or h <= 0:
        raise DatasetError(f"{where}: box has zero size (w={w}, h={h})")
    x0, y0, x1, y1 = xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
    if min(x0, y0) < -_TOLERANCE or max(x1, y1) > 1 + _TOLERANCE:
        raise DatasetError(f"{where}: box ({x0:.4f}, {y0:.4f}, {x1:.4f}, {y1:.4f}) lies "
                           "outside the image (normalised coordinates must be in [0, 1])")
    try:
        return BoxLabel(max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0), names[index])
    except ValueError as exc:  # an overshoot that clipping left empty
        raise DatasetError(f"{where}: {exc}") from exc


def read_yolo(root: Path) -> SampleSet:
    """Read a YOLO dataset; see the module docstring for the layout."""
    folders = _image_folders(root)
    if not folders:
        raise DatasetError(f"{root}: a YOLO dataset needs images/ and labels/ folders "
                           "(or train/, valid/, test/ folders holding them)")
    classes = read_class_names(root)
    samples = []
    for folder_split, images_dir, labels_dir in folders:
        for image in yolo_images(images_dir):
            relative = image.relative_to(images_dir)
            label_file = (labels_dir / relative).with_suffix(".txt")
            boxes = parse_label_file(label_file, classes) if label_file.is_file() else ()
            split = folder_split or (split_of(relative.parts[0]) if len(relative.parts) > 1
                                     else None)
            samples.append(Sample(path=image, label=int(bool(boxes)), boxes=boxes,
                                  split=split))
    if not samples:
        where = " and ".join(str(images_dir) for _, images_dir, _ in folders)
        raise DatasetError(f"{where}: no images ({', '.join(YOLO_SUFFIXES)})")
    names = DEFAULT_CLASSES if classes is None else classes
    return SampleSet("yolo", root, tuple(samples), tuple(names[i] for i in sorted(names)))


def yolo_images(images_dir: Path) -> list[Path]:
    """The visible JPEG/PNG files anywhere under `images_dir`, sorted."""
    return sorted(p for p in images_dir.rglob("*")
                  if p.suffix.lower() in YOLO_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(images_dir).parts))


def _yaml_names(path: Path) -> dict[int, str]:
    """`names:` from a data.yaml, as a list or an {index: name} map."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DatasetError(f"{path}: cannot be read as YAML ({exc})") from exc
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, list) and names:
        return {index: str(name) for index, name in enumerate(names)}
    if isinstance(names, dict) and names:
        try:
            return {int(index): str(name) for index, name in names.items()}
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{path}: names: keys must be class indices ({exc})") from exc
    raise DatasetError(f"{path}: needs 'names:' as a non-empty list or {{index: name}} map")


def _line_names(path: Path) -> dict[int, str]:
    """Class names one per line (classes.txt, obj.names): line n names class n - 1."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot be read as text ({exc})") from exc
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DatasetError(f"{path}: names no classes (expected one class name per line)")
    if "" in names:
        raise DatasetError(f"{path}:{names.index('') + 1}: blank line inside the class list "
                           "(class indices are line numbers, so it would shift the rest)")
    return dict(enumerate(names))
