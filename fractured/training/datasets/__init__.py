"""Dataset readers: the layouts fracture data comes in, read into one `SampleSet`.

`open_dataset` takes a path (and the format, when detection would guess wrong) and
returns samples with labels, boxes, groups and shipped splits, without decoding a
pixel. Each format's layout is described in its module's docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from fractured.training.datasets import coco, dicom_csv, fracatlas, imagefolder, mura, yolo
from fractured.training.datasets.base import (
    IMAGE_SUFFIXES,
    SPLITS,
    BoxLabel,
    DatasetError,
    Sample,
    SampleSet,
    is_image,
)

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "SPLITS", "BoxLabel", "DatasetError", "Sample",
           "SampleSet", "detect_format", "is_image", "open_dataset"]

FORMATS = ("imagefolder", "mura", "yolo", "coco", "dicom-csv", "fracatlas")

#: Detection order: the most specific layout first (FracAtlas is YOLO plus a manifest,
#: and the images/ folder of a YOLO or COCO set would pass for an imagefolder class).
_DETECTORS: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    ("fracatlas", fracatlas.matches),
    ("yolo", yolo.matches),
    ("coco", coco.matches),
    ("dicom-csv", dicom_csv.matches),
    ("mura", mura.matches),
    ("imagefolder", imagefolder.matches),
)

_LAYOUTS = """\
  fracatlas:   a folder with manifest.csv, images/ and labels/
  yolo:        a folder with images/ and labels/ (one .txt of 'class xc yc w h' per image),
               or with train/ valid/ test/ folders holding them (Roboflow)
  coco:        a .json file, or a folder with exactly one .json at the top or in annotations/
  dicom-csv:   a .csv file listing DICOM files (columns file, label, ...)
  mura:        a folder with XR_<PART>/ folders, directly or under train/ and valid/
  imagefolder: a folder of class folders of images, optionally under train/ val/ test/"""

_READERS: dict[str, Callable[[Path], SampleSet]] = {
    "mura": mura.read_mura,
    "yolo": yolo.read_yolo,
    "coco": coco.read_coco,
    "dicom-csv": dicom_csv.read_dicom_csv,
    "fracatlas": fracatlas.read_fracatlas,
}


def detect_format(path: str | Path) -> str:
    """The format `path` is laid out in; DatasetError lists the layouts looked for."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    for name, matches in _DETECTORS:
        if matches(path):
            return name
    raise DatasetError(f"{path}: not a dataset layout this reader knows; looked for\n"
                       f"{_LAYOUTS}\n(pass the format explicitly if detection is wrong)")


def open_dataset(path: str | Path, format: str | None = None, *,
                 positive: Sequence[str] | None = None) -> SampleSet:
    """Read the dataset at `path` in `format` (one of FORMATS; detected when None).

    `positive` names the positive class folders of an imagefolder dataset, where the
    folder names alone do not say which is which. Samples come sorted by path.
    """
    path = Path(path)
    name = detect_format(path) if format is None else format
    if name not in FORMATS:
        raise DatasetError(f"unknown dataset format {name!r}; expected one of {FORMATS}")
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if name == "imagefolder":
        return imagefolder.read_imagefolder(path, positive)
    if positive is not None:
        raise DatasetError(f"{path}: positive class folders apply only to imagefolder "
                           f"datasets, not {name}")
    return _READERS[name](path)
