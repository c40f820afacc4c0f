"""Pixel data to what the model and the radiologist see.

`display_pixels` applies the same chain a viewer does (Modality LUT, first VOI window or
VOI LUT, MONOCHROME1 inversion), so the model sees bone bright whatever the vendor wrote,
and overlays show the X-ray as the radiologist is used to seeing it.

`letterbox` fits such an image (or a rectangle of it: its exposed field, see
engine.exposed_field) into the model's square input, and the `Letterbox` it returns maps
heatmaps and points from the model input back onto the whole source image's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fractured.dicom_files import HEADER_LIMIT, InflateLimitExceeded, read_file
from fractured.engine.exposed_field import Field
from fractured.engine.percentiles import percentiles

#: The largest image decoded by default, in megapixels (rows x columns x frames x
#: samples): a 43 x 43 cm detector at 0.1 mm is 18.5. Decoding and windowing take about
#: 25 bytes a pixel at their peak, so 40 megapixels is about 1 GB; a 6 MB RLE file of
#: 20000 x 20000 pixels asked for 6.5 GB before there was a limit.
MAX_MEGAPIXELS = 40.0


class DecodeError(Exception):
    """Pixel data that cannot be turned into an image; the message names the file and why."""


class ImageTooLarge(DecodeError):
    """An image whose decoded size is over the limit: refused before it is decoded."""


def read_dataset(path: str | Path, max_megapixels: float = MAX_MEGAPIXELS) -> Dataset:
    """Read a DICOM file, with a DecodeError naming the file when it is not DICOM, and
    ImageTooLarge when it is deflated and would inflate to more than an image of
    `max_megapixels` at 32 bits a pixel takes (and a header)."""
    limit = int(max_megapixels * 1e6) * 4 + HEADER_LIMIT
    try:
        return read_file(path, max_inflated=limit)
    except InflateLimitExceeded as exc:
        raise ImageTooLarge(f"{path}: {exc}, more than an image of {max_megapixels:g} "
                            "megapixels needs") from exc
    except Exception as exc:  # pydicom raises several types for a bad file
        raise DecodeError(f"{path}: not a readable DICOM file ({exc})") from exc


def display_pixels(ds: Dataset, source: str = "",
                   max_megapixels: float = MAX_MEGAPIXELS) -> np.ndarray:
    """Return the first frame as float32 in [0, 1], windowed and with bone bright.

    Raises DecodeError naming `source` (a file name or UID) when the pixel data is
    missing, in an undecodable transfer syntax, or not single-channel; ImageTooLarge,
    before anything is decoded, when its rows x columns x frames x samples are over
    `max_megapixels`.
    """
    try:
        where = source or str(ds.get("SOPInstanceUID", "dataset"))
    except Exception:  # a corrupt element, decoded only now (pydicom reads lazily)
        where = "dataset"
    try:
        _check_size(ds, where, max_megapixels)
        return _display_pixels(ds, where)
    except DecodeError:
        raise
    except Exception as exc:  # an element pydicom cannot decode or a LUT it cannot apply
        raise DecodeError(f"{where}: unreadable image attributes ({type(exc).__name__}: "
                          f"{exc})") from exc


def _check_size(ds: Dataset, where: str, max_megapixels: float) -> None:
    """ImageTooLarge when decoding every frame of the pixel data would make more than
    `max_megapixels` million values (pydicom decodes them all)."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    megapixels = rows * cols * frames * samples / 1e6
    if megapixels > max_megapixels:
        shape = f"{rows} x {cols}" + (f" x {frames} frames" if frames > 1 else "")
        raise ImageTooLarge(f"{where}: {shape} pixels ({megapixels:.0f} megapixels) is more "
                            f"than the {max_megapixels:g} megapixels decoded at most")


def _display_pixels(ds: Dataset, where: str) -> np.ndarray:
    """display_pixels without its catch-all (see there)."""
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

    modality = apply_modality_lut(frame, ds)
    if modality.dtype.kind == "f" and np.array_equal(modality, np.round(modality)):
        modality = modality.astype(np.int64)  # a VOI LUT is indexed by integer values
    values = modality.astype(np.float64)
    padding = _padding_mask(frame, ds)
    image = values[~padding] if padding.any() else values  # what the range is taken from
    if image.size == 0:
        raise DecodeError(f"{where}: every pixel is pixel padding")
    scaled = None
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        windowed = apply_voi_lut(modality, ds, index=0).astype(np.float64)
        scaled = _stretch(windowed, *_value_range(windowed, ds, windowed=True))
        if _is_flat(scaled[~padding]):
            # A window that misses the data (seen in real files: a 16-bit DX whose
            # window covers 68-5380 while its pixels span 32744-65535) would give a
            # blank image; fall back to the data's own range, as viewers do.
            scaled = None
    if scaled is None:
        scaled = _stretch(values, *_value_range(image, ds, windowed=False))
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    scaled[padding] = 0.0  # padding is "no image": black whatever the photometric
    return scaled.astype(np.float32)


def _padding_mask(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Pixels marked as padding (PS3.3 C.7.5.1.1.2), e.g. outside the collimated field.

    Pixel Padding Value, with Pixel Padding Range Limit when present, names stored
    values (before the Modality LUT); they carry no anatomy, so they are left out of the
    grey-scale range and shown black.
    """
    if "PixelPaddingValue" not in ds:
        return np.zeros(frame.shape, dtype=bool)
    first = int(ds.PixelPaddingValue)
    limit = int(ds.get("PixelPaddingRangeLimit", first))
    low, high = min(first, limit), max(first, limit)
    return (frame >= low) & (frame <= high)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0)


def _is_flat(scaled: np.ndarray) -> bool:
    """True when 98 % of the pixels share one grey level: no usable image left."""
    low, high = percentiles(scaled, [1, 99])
    return float(high - low) < 1e-3


def _value_range(values: np.ndarray, ds: Dataset, *, windowed: bool) -> tuple[float, float]:
    """The output range of the VOI transform, to stretch to [0, 1].

    A VOI LUT's output range is given by its descriptor's bit depth; a window maps to the
    range pydicom's `apply_windowing` uses (PS3.3 C.11.2.1.2). Without any VOI, the raw
    range is used with 0.5 % tails clipped, as a viewer's automatic window would.
    """
    if not windowed:
        return float(percentiles(values, 0.5)), float(percentiles(values, 99.5))
    if "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        half = 2 ** (int(ds.BitsStored) - 1)
        low, high = float(-half), float(half - 1)
    if not ds.get("ModalityLUTSequence") and "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    return low, high


@dataclass(frozen=True)
class Letterbox:
    """How a source image was fitted into the square model input, and its exact inverse.

    The image is scaled by `scale` (aspect ratio kept) and centred with `pad_top` /
    `pad_left` pixels of black padding. Coordinates are continuous pixel coordinates:
    pixel (row r, column c) covers [c, c + 1) x [r, r + 1), so its centre is c + 0.5.
    That is the convention cv2.resize samples with, which makes the point mapping below
    agree with where the pixels actually went.

    With a `field`, only that rectangle of the source was fitted (a crop to the exposed
    field); every mapping still speaks of the whole source image's pixel grid, which the
    SR's boxes and the overlays are drawn on.
    """

    src_rows: int
    src_cols: int
    size: int
    scale: float
    pad_top: int
    pad_left: int
    field: Field | None = None  # the source rectangle fitted; None = the whole image

    @property
    def region(self) -> Field:
        """The source rectangle that was fitted into the model input."""
        return self.field if self.field is not None else Field.whole(self.src_rows,
                                                                     self.src_cols)

    @property
    def content_rows(self) -> int:
        """Rows the scaled image occupies in the model input (the rest is padding)."""
        return _scaled_length(self.region.rows, self.scale, self.size)

    @property
    def content_cols(self) -> int:
        """Columns the scaled image occupies in the model input."""
        return _scaled_length(self.region.cols, self.scale, self.size)

    def point_to_model(self, x: float, y: float) -> tuple[float, float]:
        """Source pixel coordinates (x = column, y = row) to model-input coordinates."""
        region = self.region
        return (self.pad_left + (x - region.left) * self.content_cols / region.cols,
                self.pad_top + (y - region.top) * self.content_rows / region.rows)

    def point_to_source(self, x: float, y: float) -> tuple[float, float]:
        """Model-input coordinates (x = column, y = row) to source pixel coordinates.

        Uses each axis's actual scale (the scaled lengths are rounded to whole pixels),
        so it is the exact inverse of `point_to_model`. Points in the padding map outside
        the fitted region; callers clip boxes as they need.
        """
        region = self.region
        return ((x - self.pad_left) * region.cols / self.content_cols + region.left,
                (y - self.pad_top) * region.rows / self.content_rows + region.top)

    def box_to_source(self, x0: float, y0: float, x1: float,
                      y1: float) -> tuple[float, float, float, float]:
        """A model-input box (x0, y0, x1, y1) in source pixel coordinates, clipped to the
        fitted region (the whole image, or its field).

        A detector may put part of a box on the letterbox padding; clipping keeps every
        box that reaches a result on pixels the model actually saw.
        """
        left, top = self.point_to_source(x0, y0)
        right, bottom = self.point_to_source(x1, y1)
        region = self.region
        return (_clip(left, region.left, region.right), _clip(top, region.top, region.bottom),
                _clip(right, region.left, region.right),
                _clip(bottom, region.top, region.bottom))

    def heatmap_to_source(self, heatmap: np.ndarray) -> np.ndarray:
        """Resample a map over the whole model input (any resolution) to the source grid.

        The map is brought to model-input resolution, the padding is cropped away, and
        the rest is resized onto the fitted region of a src_rows x src_cols map: the same
        geometry `letterbox` used, run backwards, so a hot spot lands on the source pixels
        that produced it. Outside a field the map is 0: the model saw nothing there.
        """
        if heatmap.ndim != 2:
            raise ValueError(f"heatmap must be 2-D, got shape {heatmap.shape}")
        full = cv2.resize(heatmap.astype(np.float32), (self.size, self.size),
                          interpolation=_interpolation(heatmap.shape, (self.size, self.size)))
        content = full[self.pad_top:self.pad_top + self.content_rows,
                       self.pad_left:self.pad_left + self.content_cols]
        region = self.region
        target = (region.rows, region.cols)
        out = np.zeros((self.src_rows, self.src_cols), dtype=np.float32)
        out[region.top:region.bottom, region.left:region.right] = cv2.resize(
            content, (region.cols, region.rows),
            interpolation=_interpolation(content.shape, target))
        return out


def letterbox(image: np.ndarray, size: int,
              field: Field | None = None) -> tuple[np.ndarray, Letterbox]:
    """Fit a 2-D image (or its `field`, a rectangle inside it) into size x size, keeping
    its aspect ratio, centred on black.

    Padding rather than stretching keeps bone shapes (and so fracture lines) undistorted;
    black is what the air around a limb looks like, so padding reads as background.
    """
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    rows, cols = image.shape
    if field is not None and not (0 <= field.top < field.bottom <= rows
                                  and 0 <= field.left < field.right <= cols):
        raise ValueError(f"field {field} is not a non-empty rectangle of the "
                         f"{rows} x {cols} image")
    part = image if field is None else image[field.top:field.bottom, field.left:field.right]
    scale = size / max(part.shape)
    box = Letterbox(src_rows=rows, src_cols=cols, size=size, scale=scale,
                    pad_top=(size - _scaled_length(part.shape[0], scale, size)) // 2,
                    pad_left=(size - _scaled_length(part.shape[1], scale, size)) // 2,
                    field=field)
    target = (box.content_rows, box.content_cols)
    resized = part if target == part.shape else cv2.resize(
        part, (box.content_cols, box.content_rows),
        interpolation=_interpolation(part.shape, target))
    out = np.zeros((size, size), dtype=image.dtype)
    out[box.pad_top:box.pad_top + box.content_rows,
        box.pad_left:box.pad_left + box.content_cols] = resized
    return out, box


def to_model_input(images: Sequence[np.ndarray], mean: Sequence[float],
                   std: Sequence[float]) -> np.ndarray:
    """Stack letterboxed greyscale images into a normalised (B, 3, size, size) batch.

    The grey image is replicated into three channels because the backbones are
    three-channel networks (and ImageNet-style normalisation stays usable if pretrained
    weights are ever allowed).
    """
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each, got {list(mean)}, {list(std)}")
    grey = np.stack([np.asarray(image, dtype=np.float32) for image in images])
    batch = np.repeat(grey[:, np.newaxis], 3, axis=1)
    batch -= np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    batch /= np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return batch


def _clip(value: float, low: int, high: int) -> float:
    return min(max(float(value), float(low)), float(high))


def _scaled_length(length: int, scale: float, size: int) -> int:
    return min(max(round(length * scale), 1), size)


def _interpolation(src_shape: tuple[int, ...], dst_shape: tuple[int, int]) -> int:
    """Area averaging when shrinking (no aliasing), bilinear when enlarging."""
    shrinking = dst_shape[0] * dst_shape[1] < src_shape[0] * src_shape[1]
    return cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
