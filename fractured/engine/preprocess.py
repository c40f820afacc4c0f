"""Pixel data to what the model and the radiologist see.

`display_pixels` applies the same chain a viewer does (Modality LUT, first VOI window or
VOI LUT, MONOCHROME1 inversion), so the model sees bone bright whatever the vendor wrote,
and overlays show the X-ray as the radiologist is used to seeing it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut


class DecodeError(Exception):
    """Pixel data that cannot be turned into an image; the message names the file and why."""


def read_dataset(path: str | Path) -> Dataset:
    """Read a DICOM file, with a DecodeError naming the file when it is not DICOM."""
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for a bad file
        raise DecodeError(f"{path}: not a readable DICOM file ({exc})") from exc


def display_pixels(ds: Dataset, source: str = "") -> np.ndarray:
    """Return the first frame as float32 in [0, 1], windowed and with bone bright.

    Raises DecodeError naming `source` (a file name or UID) when the pixel data is
    missing, in an undecodable transfer syntax, or not single-channel.
    """
    where = source or str(getattr(ds, "SOPInstanceUID", "dataset"))
    if "PixelData" not in ds:
        raise DecodeError(f"{where}: no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DecodeError(f"{where}: photometric interpretation {photometric or 'missing'!r} "
                          "is not greyscale (MONOCHROME1/2 expected)")
    try:
        frame = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise DecodeError(f"{where}: cannot decode pixel data ({name}): {exc}") from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        frame = frame[0]
    if frame.ndim != 2:
        raise DecodeError(f"{where}: expected one greyscale frame, got shape {frame.shape}")

    values = apply_modality_lut(frame, ds).astype(np.float64)
    scaled = None
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        windowed = apply_voi_lut(values, ds, index=0).astype(np.float64)
        scaled = _stretch(windowed, *_value_range(windowed, ds, windowed=True))
        if _is_flat(scaled):
            # A window that misses the data (seen in real files: a 16-bit DX whose
            # window covers 68-5380 while its pixels span 32744-65535) would give a
            # blank image; fall back to the data's own range, as viewers do.
            scaled = None
    if scaled is None:
        scaled = _stretch(values, *_value_range(values, ds, windowed=False))
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)


def _is_flat(scaled: np.ndarray) -> bool:
    """True when 98 % of the pixels share one grey level: no usable image left."""
    low, high = np.percentile(scaled, [1, 99])
    return float(high - low) < 1e-3


def _value_range(values: np.ndarray, ds: Dataset, *, windowed: bool) -> tuple[float, float]:
    """The output range of the VOI transform, to stretch to [0, 1].

    A VOI LUT's output range is given by its descriptor's bit depth; a window maps to the
    range pydicom's `apply_windowing` uses (PS3.3 C.11.2.1.2). Without any VOI, the raw
    range is used with 0.5 % tails clipped, as a viewer's automatic window would.
    """
    if not windowed:
        return float(np.percentile(values, 0.5)), float(np.percentile(values, 99.5))
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        low, high = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    if not ds.get("ModalityLUTSequence") and "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high
