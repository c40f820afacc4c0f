"""COCO JSON (CVAT, Label Studio, Roboflow exports; the FracAtlas release): boxes in pixels.

Layout: one annotation file, given as the .json itself or as a folder holding exactly
one .json at its top level or under annotations/. Image `file_name`s are looked up
relative to the JSON's folder, then in `<json folder>/images/`, then, when the JSON sits
in annotations/, in the `images/` beside that folder.

Read keys: `images` (id, file_name, width, height), `annotations` (image_id, bbox as
[x, y, w, h] in pixels, category_id) and `categories` (id, name). Boxes are normalised
by the JSON's width/height (the image is not opened), labelled with their category
name; `SampleSet.box_labels` lists the category names in id order. label = 1 iff the
image has an annotation (every category counts as a finding) and an image without
annotations has no boxes (label 0). `iscrowd` annotations are kept as ordinary boxes
and segmentations are ignored. A box may overshoot the image by up to 1 px (rounding
in exporters) and is clipped; beyond that, or with zero size, it is refused, naming the
annotation. The image id is kept in `attributes["image_id"]`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fractured.training.datasets.base import BoxLabel, DatasetError, Sample, SampleSet

#: How far (in pixels) a box may overshoot the image before it is an error, not rounding.
PIXEL_TOLERANCE = 1.0


_PEEK_BYTES = 1 << 20


def annotation_files(folder: Path) -> list[Path]:
    """The .json files at the top of `folder` and in its annotations/ folder."""
    found = [p for d in (folder, folder / "annotations") if d.is_dir() for p in d.glob("*.json")]
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def matches(path: Path) -> bool:
    """Whether `path` is a .json file, or a folder with exactly one annotation file that
    looks like COCO (so an ImageFolder set with a stray metadata .json, as Kaggle
    downloads have, is not taken for COCO)."""
    if path.is_file():
        return path.suffix.lower() == ".json"
    if not path.is_dir():
        return False
    found = annotation_files(path)
    return len(found) == 1 and _looks_like_coco(found[0])


def _looks_like_coco(path: Path) -> bool:
    """An `"images"` key in the first MiB. Only the short info, licenses and categories
    blocks come before the images list in the files exporters write, and a peek spares
    parsing an annotation file of hundreds of MB just to detect its format."""
    try:
        with open(path, "rb") as fh:
            return b'"images"' in fh.read(_PEEK_BYTES)
    except OSError:
        return False


def pixel_box(x0: float, y0: float, x1: float, y1: float, width: float, height: float,
              label: str = "fracture") -> BoxLabel:
    """A corner box in pixels of a width x height image, normalised; ValueError says why
    it is not a box inside the image. Overshoots up to PIXEL_TOLERANCE are clipped."""
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box ({x0}, {y0}, {x1}, {y1}) has zero size")
    if (x0 < -PIXEL_TOLERANCE or y0 < -PIXEL_TOLERANCE
            or x1 > width + PIXEL_TOLERANCE or y1 > height + PIXEL_TOLERANCE):
        raise ValueError(f"box ({x0}, {y0}, {x1}, {y1}) lies outside the "
                         f"{width:g}x{height:g} image")
    return BoxLabel(max(x0, 0.0) / width, max(y0, 0.0) / height,
                    min(x1, width) / width, min(y1, height) / height, label)


def read_coco(path: Path) -> SampleSet:
    """Read a COCO annotation file (or a folder holding one); see the module docstring."""
    json_path = _annotation_file(path)
    data = _load(json_path)
    categories = _categories(data["categories"], json_path)
    images: dict[Any, tuple[Path, float, float]] = {}
    by_path: dict[Path, Any] = {}
    for index, entry in enumerate(data["images"]):
        where = f"{json_path}: images[{index}]"
        _require(entry, ("id", "file_name", "width", "height"), where)
        image_id = entry["id"]
        if image_id in images:
            raise DatasetError(f"{where}: duplicate image id {image_id!r}")
        width, height = _size(entry["width"], where), _size(entry["height"], where)
        file = _image_file(json_path, str(entry["file_name"]), f"{where} (id {image_id!r})")
        if file in by_path:
            raise DatasetError(f"{where}: image ids {by_path[file]!r} and {image_id!r} "
                               f"both name {entry['file_name']!r}")
        images[image_id] = (file, width, height)
        by_path[file] = image_id
    boxes: dict[Any, list[BoxLabel]] = {image_id: [] for image_id in images}
    for index, ann in enumerate(data["annotations"]):
        where = f"{json_path}: annotations[{index}]"
        _require(ann, ("image_id", "bbox", "category_id"), where)
        if "id" in ann:
            where += f" (id {ann['id']!r})"
        if ann["image_id"] not in images:
            raise DatasetError(f"{where}: image_id {ann['image_id']!r} is not in images")
        if ann["category_id"] not in categories:
            raise DatasetError(f"{where}: category_id {ann['category_id']!r} "
                               "is not in categories")
        boxes[ann["image_id"]].append(
            _box(ann["bbox"], images[ann["image_id"]], categories[ann["category_id"]], where))
    samples = [Sample(path=file, label=int(bool(boxes[image_id])),
                      boxes=tuple(boxes[image_id]), attributes={"image_id": str(image_id)})
               for image_id, (file, _, _) in images.items()]
    if not samples:
        raise DatasetError(f"{json_path}: 'images' is empty")
    return SampleSet("coco", json_path, tuple(sorted(samples, key=lambda s: s.path)),
                     tuple(categories[i] for i in sorted(categories)))


def _annotation_file(path: Path) -> Path:
    """The JSON to read: `path` itself, or the one annotation file in the folder."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(f"{path}: no such file or directory")
    found = annotation_files(path)
    if len(found) != 1:
        listed = ", ".join(str(p) for p in found) or "none"
        raise DatasetError(f"{path}: expected exactly one COCO .json at the top or under "
                           f"annotations/, found {len(found)} ({listed}); pass the file")
    return found[0]


def _load(json_path: Path) -> dict[str, Any]:
    """The parsed JSON, with the three top-level lists COCO needs."""
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{json_path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetError(f"{json_path}: expected a COCO object at the top, not a list/value")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{json_path}: missing top-level list {key!r} "
                               "(not a COCO annotation file?)")
    return data


def _categories(entries: list[Any], json_path: Path) -> dict[Any, str]:
    """{category id: name}; ids must be unique."""
    categories: dict[Any, str] = {}
    for index, entry in enumerate(entries):
        where = f"{json_path}: categories[{index}]"
        _require(entry, ("id", "name"), where)
        if entry["id"] in categories:
            raise DatasetError(f"{where}: duplicate category id {entry['id']!r}")
        categories[entry["id"]] = str(entry["name"])
    return categories


def _require(entry: Any, keys: tuple[str, ...], where: str) -> None:
    """DatasetError at `where` unless `entry` is an object with all `keys`."""
    if not isinstance(entry, Mapping):
        raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise DatasetError(f"{where}: missing key(s) {missing}")


def _size(value: Any, where: str) -> float:
    """A positive image width/height."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise DatasetError(f"{where}: width and height must be positive numbers, got {value!r}")
    return float(value)


def _image_file(json_path: Path, file_name: str, where: str) -> Path:
    """The first existing place a COCO file_name can be (see the module docstring)."""
    folder = json_path.parent
    places = [folder, folder / "images"]
    if folder.name == "annotations":
        places.append(folder.parent / "images")
    for place in places:
        if (place / file_name).is_file():
            return place / file_name
    raise DatasetError(f"{where}: image file {file_name!r} not found in "
                       f"{', '.join(str(p) for p in places)}")


def _box(bbox: Any, image: tuple[Path, float, float], label: str, where: str) -> BoxLabel:
    """A COCO [x, y, w, h] pixel box as a normalised BoxLabel."""
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)):
        raise DatasetError(f"{where}: bbox must be [x, y, w, h] numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    _, width, height = image
    try:
        return pixel_box(x, y, x + w, y + h, width, height, label)
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc}") from exc
