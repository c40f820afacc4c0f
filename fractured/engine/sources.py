"""Any input image file to display pixels: DICOM (via `display_pixels`), PNG or JPEG.

`fractured predict` and the training readers take the same files a radiologist would
export, so they go through one door; only DICOM carries the UIDs a result object needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset

from fractured.engine.findings import ImageRef
from fractured.engine.preprocess import DecodeError, display_pixels, read_dataset

_DICOM_MAGIC_OFFSET = 128
_JPEG_START = b"\xff\xd8"  # start-of-image marker
_JPEG_END = b"\xff\xd9"  # end-of-image marker


@dataclass(frozen=True)
class LoadedImage:
    """One input image. `dataset` and a UID-bearing `ref` exist only for DICOM files."""

    path: Path
    pixels: np.ndarray  # float32 [0, 1], bone bright, source pixel grid
    ref: ImageRef
    dataset: Dataset | None


def is_dicom(path: Path) -> bool:
    """DICOM Part 10 by its 'DICM' magic, or a .dcm name (files without the preamble)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(_DICOM_MAGIC_OFFSET)
            if fh.read(4) == b"DICM":
                return True
    except OSError:
        return False
    return path.suffix.lower() in (".dcm", ".dicom")


def load_image(path: str | Path) -> LoadedImage:
    """Read a DICOM, PNG or JPEG file; DecodeError names the file and why it failed."""
    path = Path(path)
    if not path.is_file():
        raise DecodeError(f"{path}: no such file")
    if is_dicom(path):
        ds = read_dataset(path)
        return LoadedImage(path, display_pixels(ds, str(path)), image_ref(ds), ds)
    return LoadedImage(path, _read_picture(path), ImageRef("", "", "", ""), None)


def image_ref(ds: Dataset) -> ImageRef:
    """The UIDs that tie a finding to its DICOM instance (empty where a file lacks one)."""
    return ImageRef(study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                    series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                    sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
                    sop_class_uid=str(ds.get("SOPClassUID", "")))


def _read_picture(path: Path) -> np.ndarray:
    """A PNG/JPEG as grey in [0, 1]: colour is averaged, 16-bit PNGs keep their depth."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DecodeError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        if bytes(data[:2]) == _JPEG_START and bytes(data[-2:]) != _JPEG_END:
            # Decoding what is there would fill the missing rows with flat grey, which
            # a model reads as anatomy: refused, but saying why (FracAtlas has 51).
            raise DecodeError(f"{path}: a truncated JPEG (the file ends before its "
                              "end-of-image marker)")
        raise DecodeError(f"{path}: not a readable DICOM, PNG or JPEG image")
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype not in (np.uint8, np.uint16):
        raise DecodeError(f"{path}: unsupported pixel type {image.dtype}")
    return (image.astype(np.float32) / np.iinfo(image.dtype).max).astype(np.float32)
