"""`fractured data inspect DATASET`: what a dataset holds, before a model is trained on it.

Label balance per body part, image sizes, where and how big the boxes are, files that
cannot be read, and near-duplicate groups (with a montage, so a person can judge them):
the things that decide whether a score on this data will mean anything. Written as
summary.json and small PNG plots in an output directory; `Inspection.table()` is the
text the CLI prints.

Sizes come from file headers (Pillow for PNG/JPEG, pydicom without pixels for DICOM), so
they cost milliseconds per image; only duplicate detection decodes every image.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
from matplotlib.figure import Figure
from PIL import Image
from pydicom.errors import InvalidDicomError

from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import is_dicom, load_image
from fractured.training.datasets.base import SPLITS, SampleSet
from fractured.training.dedup import DEFAULT_THRESHOLD, duplicate_groups, image_hashes
from fractured.training.splits import relative_path

SUMMARY_NAME = "summary.json"
#: Plot size: small enough to glance at in a report or a terminal image viewer.
FIGSIZE = (6.0, 4.0)
DPI = 100
#: The montage shows this many duplicate groups, this many images of each.
MONTAGE_GROUPS = 6
MONTAGE_IMAGES = 4
_THUMB = 128
_CENTRE_BINS = 20
_UNKNOWN = "unknown"
#: Unreadable files the table lists by name.
_LISTED = 5


@dataclass(frozen=True)
class Inspection:
    """The numbers (`summary`, as written to summary.json) and the files written."""

    summary: dict[str, Any]
    files: tuple[Path, ...]

    def table(self) -> str:
        """The summary as aligned text tables, for a terminal."""
        return _table(self.summary)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header; DecodeError naming the file if unreadable."""
    try:
        if is_dicom(path):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        with Image.open(path) as picture:
            return picture.size
    except (OSError, AttributeError, InvalidDicomError) as exc:
        raise DecodeError(f"{path}: cannot read the image size ({exc})") from exc


def inspect_dataset(sample_set: SampleSet, out_dir: str | Path, *, duplicates: bool = True,
                    threshold: int = DEFAULT_THRESHOLD,
                    workers: int | None = None) -> Inspection:
    """Inspect a dataset, write summary.json and the plots into `out_dir`.

    Unreadable files are listed in the summary rather than stopping the inspection:
    finding them is what this is for. With `duplicates`, every image is decoded and
    hashed (`workers` threads) and near-duplicate groups at `threshold` are reported.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = sample_set.samples
    paths = [relative_path(sample_set, sample) for sample in samples]
    unreadable: dict[int, str] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for index, sample in enumerate(samples):
        try:
            sizes[index] = image_size(sample.path)
        except DecodeError as exc:
            unreadable[index] = str(exc)
    groups: list[list[int]] = []
    if duplicates:
        groups = _duplicates(sample_set, threshold, unreadable, workers)
    geometry = _box_geometry(sample_set, sizes)

    summary: dict[str, Any] = {
        "format": sample_set.format,
        "root": str(sample_set.root),
        "images": len(samples),
        "labels": _count(str(sample.label) for sample in samples),
        "body_part_label": _body_part_label(sample_set),
        "shipped_split": {**{name: sum(sample.split == name for sample in samples)
                             for name in SPLITS},
                          "none": sum(sample.split is None for sample in samples)},
        "image_size": _size_summary(list(sizes.values())),
        "boxes": _box_summary(sample_set, geometry),
        "unreadable": [{"path": paths[i], "error": unreadable[i]} for i in sorted(unreadable)],
    }
    if duplicates:
        summary["duplicates"] = {
            "threshold": threshold,
            "groups": len(groups),
            "images": sum(len(group) for group in groups),
            "largest": max((len(group) for group in groups), default=0),
            "conflicting_labels": sum(len({samples[i].label for i in group}) > 1
                                      for group in groups),
            "members": [[paths[i] for i in group] for group in groups],
        }

    files = [out / SUMMARY_NAME]
    files[0].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    files += _plots(sample_set, sizes, geometry, groups, out)
    return Inspection(summary, tuple(files))


def _duplicates(sample_set: SampleSet, threshold: int, unreadable: dict[int, str],
                workers: int | None) -> list[list[int]]:
    """Near-duplicate groups among the readable images (sample indices); files that fail
    to decode are added to `unreadable`."""
    candidates = [i for i in range(len(sample_set.samples)) if i not in unreadable]
    failed: dict[int, str] = {}
    hashes = image_hashes([sample_set.samples[i].path for i in candidates], workers=workers,
                          unreadable=failed)
    unreadable.update({candidates[i]: message for i, message in failed.items()})
    return [[candidates[i] for i in group] for group in duplicate_groups(hashes, threshold)]


def _count(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def _body_part_label(sample_set: SampleSet) -> dict[str, dict[str, int]]:
    table: dict[str, dict[str, int]] = {}
    for sample in sample_set.samples:
        row = table.setdefault(sample.body_part or _UNKNOWN, {"0": 0, "1": 0})
        row[str(sample.label)] += 1
    return dict(sorted(table.items()))


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not len(values):
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"count": int(array.size), "min": round(float(array.min()), 4),
            "median": round(float(np.median(array)), 4),
            "mean": round(float(array.mean()), 4), "max": round(float(array.max()), 4)}


def _size_summary(sizes: list[tuple[int, int]]) -> dict[str, Any]:
    return {
        "width": _stats([width for width, _ in sizes]),
        "height": _stats([height for _, height in sizes]),
        "most_common": [[f"{width}x{height}", count]
                        for (width, height), count in Counter(sizes).most_common(5)],
    }


def _box_geometry(sample_set: SampleSet,
                  sizes: dict[int, tuple[int, int]]) -> dict[str, list[float]]:
    """Per box: normalised width, height, area, centre, and aspect (width / height in
    pixels where the image size is known, in normalised units otherwise)."""
    geometry: dict[str, list[float]] = {key: [] for key in
                                        ("width", "height", "area", "aspect", "cx", "cy")}
    for index, sample in enumerate(sample_set.samples):
        image_w, image_h = sizes.get(index, (1, 1))
        for box in sample.boxes or ():
            width, height = box.x1 - box.x0, box.y1 - box.y0
            geometry["width"].append(width)
            geometry["height"].append(height)
            geometry["area"].append(width * height)
            geometry["aspect"].append(width * image_w / (height * image_h))
            geometry["cx"].append((box.x0 + box.x1) / 2)
            geometry["cy"].append((box.y0 + box.y1) / 2)
    return geometry


def _box_summary(sample_set: SampleSet, geometry: dict[str, list[float]]) -> dict[str, Any]:
    known = [sample for sample in sample_set.samples if sample.boxes is not None]
    return {
        "images_with_box_labels": len(known),
        "images_without_box_labels": len(sample_set.samples) - len(known),
        "boxes": len(geometry["width"]),
        "per_image": {str(count): number for count, number in
                      sorted(Counter(len(sample.boxes or ()) for sample in known).items())},
        "per_image_by_label": {
            label: _stats([len(sample.boxes or ()) for sample in known
                           if str(sample.label) == label]) for label in ("0", "1")},
        **{key: _stats(geometry[key]) for key in ("width", "height", "area", "aspect")},
    }


def _figure() -> tuple[Figure, Any]:
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="tight")
    return figure, figure.add_subplot()


def _plots(sample_set: SampleSet, sizes: dict[int, tuple[int, int]],
           geometry: dict[str, list[float]], groups: list[list[int]], out: Path) -> list[Path]:
    """Write the plots that have data to show; returns their paths."""
    written = [_plot_labels(sample_set, out / "labels_by_body_part.png")]
    if sizes:
        written.append(_plot_sizes(list(sizes.values()), out / "image_sizes.png"))
    known = [sample for sample in sample_set.samples if sample.boxes is not None]
    if known:
        written.append(_plot_boxes_per_image([len(s.boxes or ()) for s in known],
                                             out / "boxes_per_image.png"))
    if geometry["width"]:
        written.append(_plot_box_sizes(geometry, out / "box_sizes.png"))
        written.append(_plot_box_centres(geometry, out / "box_centres.png"))
    if groups:
        written.append(_plot_montage(sample_set, groups, out / "duplicates.png"))
    return written


def _plot_labels(sample_set: SampleSet, path: Path) -> Path:
    table = _body_part_label(sample_set)
    figure, axes = _figure()
    positions = np.arange(len(table))
    for offset, label, name in ((-0.2, "0", "label 0"), (0.2, "1", "label 1 (fracture)")):
        axes.bar(positions + offset, [row[label] for row in table.values()], width=0.4,
                 label=name)
    axes.set_xticks(positions, list(table))
    axes.set_ylabel("images")
    axes.set_title("Images per body part and label")
    axes.legend()
    figure.savefig(path)
    return path


def _plot_sizes(sizes: list[tuple[int, int]], path: Path) -> Path:
    figure, axes = _figure()
    widths, heights = zip(*sizes, strict=True)
    axes.scatter(widths, heights, s=6, alpha=0.3)
    axes.set_xlabel("width (px)")
    axes.set_ylabel("height (px)")
    axes.set_title(f"Image sizes ({len(sizes)} images)")
    figure.savefig(path)
    return path


def _plot_boxes_per_image(counts: list[int], path: Path) -> Path:
    figure, axes = _figure()
    values = Counter(counts)
    axes.bar(list(values), list(values.values()))
    axes.set_xlabel("boxes in the image")
    axes.set_ylabel("images")
    axes.set_title("Boxes per image (images with box labels)")
    figure.savefig(path)
    return path


def _plot_box_sizes(geometry: dict[str, list[float]], path: Path) -> Path:
    figure, axes = _figure()
    bins = np.linspace(0.0, 1.0, 41)
    axes.hist(geometry["width"], bins=bins, alpha=0.6, label="width")
    axes.hist(geometry["height"], bins=bins, alpha=0.6, label="height")
    axes.set_xlabel("fraction of the image")
    axes.set_ylabel("boxes")
    axes.set_title("Box sizes (normalised)")
    axes.legend()
    figure.savefig(path)
    return path


def _plot_box_centres(geometry: dict[str, list[float]], path: Path) -> Path:
    figure, axes = _figure()
    heat, _, _ = np.histogram2d(geometry["cy"], geometry["cx"], bins=_CENTRE_BINS,
                                range=[[0.0, 1.0], [0.0, 1.0]])
    shown = axes.imshow(heat, extent=(0.0, 1.0, 1.0, 0.0), cmap="magma")
    figure.colorbar(shown, ax=axes, label="boxes")
    axes.set_xlabel("x (left to right)")
    axes.set_ylabel("y (top to bottom)")
    axes.set_title("Box centres")
    figure.savefig(path)
    return path


def _thumbnail(path: Path) -> np.ndarray:
    pixels = load_image(path).pixels
    scale = _THUMB / max(pixels.shape)
    size = (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _plot_montage(sample_set: SampleSet, groups: list[list[int]], path: Path) -> Path:
    """The largest few groups, a row each, so a person can judge what the hash joined."""
    shown = sorted(groups, key=len, reverse=True)[:MONTAGE_GROUPS]
    figure = Figure(figsize=(1.6 * MONTAGE_IMAGES, 1.8 * len(shown)), dpi=DPI,
                    layout="tight")
    grid = figure.subplots(len(shown), MONTAGE_IMAGES, squeeze=False)
    for row, group in zip(grid, shown, strict=True):
        for column, axes in enumerate(row):
            axes.axis("off")
            if column < len(group):
                sample = sample_set.samples[group[column]]
                axes.imshow(_thumbnail(sample.path), cmap="gray", vmin=0.0, vmax=1.0)
                axes.set_title(f"{sample.path.name}\nlabel {sample.label}", fontsize=7)
        row[0].text(0.0, -0.08, f"group of {len(group)}", transform=row[0].transAxes,
                    fontsize=7, va="top")
    figure.savefig(path)
    return path


def _aligned(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the rest right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) if column == 0 else cell.rjust(width)
                      for column, (cell, width) in enumerate(zip(row, widths, strict=True)))
            .rstrip() for row in rows]


def _range(stats: dict[str, float]) -> str:
    if not stats["count"]:
        return "-"
    return f"{stats['min']:g}..{stats['max']:g} (median {stats['median']:g})"


def _table(summary: dict[str, Any]) -> str:
    labels = summary["labels"]
    lines = [f"{summary['format']} dataset at {summary['root']}: {summary['images']} images",
             "", *_aligned([["label", "images"],
                            *[[label, str(count)] for label, count in labels.items()]]), ""]
    parts = summary["body_part_label"]
    lines += _aligned([["body part", "label 0", "label 1", "total"],
                       *[[part, str(row["0"]), str(row["1"]), str(row["0"] + row["1"])]
                         for part, row in parts.items()]])
    shipped = summary["shipped_split"]
    lines += ["", "shipped split: " + ", ".join(f"{name} {count}"
                                                for name, count in shipped.items())]
    size = summary["image_size"]
    common = ", ".join(f"{name} ({count})" for name, count in size["most_common"])
    lines += [f"image width {_range(size['width'])}, height {_range(size['height'])}",
              f"most common sizes: {common or '-'}"]
    boxes = summary["boxes"]
    lines += ["", f"boxes: {boxes['boxes']} on {boxes['images_with_box_labels']} images with "
                  f"box labels ({boxes['images_without_box_labels']} without)"]
    if boxes["boxes"]:
        per_image = ", ".join(f"{count}: {number}" for count, number in
                              boxes["per_image"].items())
        lines += [f"boxes per image (boxes: images): {per_image}",
                  *_aligned([["box", "min", "median", "max"],
                             *[[name, f"{boxes[key]['min']:.3f}", f"{boxes[key]['median']:.3f}",
                                f"{boxes[key]['max']:.3f}"]
                               for key, name in (("width", "width / image width"),
                                                 ("height", "height / image height"),
                                                 ("area", "area / image area"),
                                                 ("aspect", "aspect (width/height, px)"))]])]
    if "duplicates" in summary:
        found = summary["duplicates"]
        lines += ["", f"near-duplicates (Hamming <= {found['threshold']}): {found['groups']} "
                      f"groups, {found['images']} images, largest {found['largest']}, "
                      f"{found['conflicting_labels']} with conflicting labels"]
    if summary["unreadable"]:
        lines += ["", f"unreadable: {len(summary['unreadable'])} files"]
        lines += [f"  {item['error']}" for item in summary["unreadable"][:_LISTED]]
        if len(summary["unreadable"]) > _LISTED:
            lines.append(f"  ... and {len(summary['unreadable']) - _LISTED} more "
                         f"(all in {SUMMARY_NAME})")
    return "\n".join(lines)
