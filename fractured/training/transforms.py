"""Training augmentation (torchvision transforms v2), box-aware for the detector.

Augmentation runs on the letterboxed grey image the model sees, (1, S, S) in [0, 1],
before normalisation, so a rotated or zoomed image keeps black (air) in its corners as
real letterboxed input does. Boxes travel through the same geometric transforms as
their pixels (v2's BoundingBoxes), and boxes pushed out of the image are dropped.
Validation and test images are never augmented.

Models are trained on JPEG exports (FracAtlas: 8-bit, windowed once by whoever exported
them) but serve DICOM (12-16-bit CR/DX windowed by the node's `display_pixels`, with
collimation bands, sharper and without JPEG artefacts). The steps below (window, gamma,
bit depth, JPEG, sharpness, borders) draw on both sides of that gap, so a model learns
neither side's look as a cue. They change the image's content region only: letterbox
padding stays exact black, as the node gives it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from fractured.training.config import AugmentSettings


def train_transform(settings: AugmentSettings, *, boxes: bool = False) -> v2.Compose:
    """The random transforms for training images (and their boxes when `boxes`)."""
    steps: list[v2.Transform] = []
    if settings.hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if settings.vflip:
        steps.append(v2.RandomVerticalFlip(p=0.5))
    if settings.rotation > 0 or settings.zoom > 0:
        steps.append(v2.RandomAffine(degrees=settings.rotation,
                                     scale=(1.0 - settings.zoom, 1.0 + settings.zoom)))
    # The DICOM-versus-export steps in the order the differences arise: collimation in
    # the exposure, then windowing, then sharpening, bit depth and JPEG on export. The
    # bands come after the geometry, so they stay square to the frame as a letterboxed
    # collimated image's are, and are kept off the boxes where those end up.
    if settings.border_p > 0 and settings.border_width > 0:
        steps.append(RandomBorders(settings.border_p, settings.border_width))
    if settings.window_p > 0 and settings.window > 0:
        steps.append(RandomWindow(settings.window_p, settings.window))
    if settings.gamma_p > 0 and settings.gamma > 1:
        steps.append(RandomGamma(settings.gamma_p, settings.gamma))
    if settings.brightness > 0 or settings.contrast > 0:
        steps.append(v2.ColorJitter(brightness=settings.brightness or None,
                                    contrast=settings.contrast or None))
    if settings.sharpness_p > 0 and settings.sharpness > 0:
        steps.append(RandomSharpness(settings.sharpness_p, settings.sharpness))
    if settings.bits_p > 0:
        steps.append(RandomBitDepth(settings.bits_p, settings.min_bits))
    if settings.jpeg_p > 0:
        steps.append(RandomJpeg(settings.jpeg_p, settings.jpeg_min_quality))
    if boxes:
        # Drops boxes that a rotation or zoom pushed (almost) out of the image, with
        # their labels, so the detector is never asked to find what is not there.
        steps.append(v2.SanitizeBoundingBoxes(min_size=2.0))
    return v2.Compose(steps or [v2.Identity()])  # Compose refuses an empty list


def normalise(grey: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(1, S, S) grey in [0, 1] -> (3, S, S) normalised: what `to_model_input` gives the
    node for the same image, so training and inference see identical tensors."""
    image = grey.expand(3, *grey.shape[-2:])
    mean_t = torch.as_tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype).view(3, 1, 1)
    return (image - mean_t) / std_t


def as_box_target(boxes: torch.Tensor, labels: torch.Tensor,
                  size: int) -> dict[str, tv_tensors.TVTensor | torch.Tensor]:
    """A detector target v2 transforms know how to move: XYXY boxes on an S x S canvas."""
    return {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(size, size)),
            "labels": labels}


def content_region(image: torch.Tensor) -> tuple[slice, slice]:
    """The rows and columns between the first and last that are not all black.

    Letterbox padding is exact black (as are a rotation's corners), so this is the image
    the model sees without it; black air at an image's edge is left out too, which only
    keeps a change a little further in. (numpy: a third of torch's time at this size.)
    """
    grey = image.as_subclass(torch.Tensor).numpy()
    lit = grey.reshape(-1, *grey.shape[-2:]).max(axis=0) > 0
    rows, cols = np.flatnonzero(lit.any(axis=1)), np.flatnonzero(lit.any(axis=0))
    if len(rows) == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _is_image(inpt: Any) -> bool:
    """What v2 hands a transform as the image: a tv_tensors.Image, or a plain tensor
    (v2 passes a plain tensor on only when the sample has no Image)."""
    return isinstance(inpt, tv_tensors.Image) or type(inpt) is torch.Tensor


def _uniform(low: float, high: float) -> float:
    """A draw from torch's generator, which the run's seed and DataLoader workers set."""
    return low + (high - low) * float(torch.rand(()))


class _ContentChange(v2.Transform):
    """A random change of the content region's grey values, with probability `p`.

    Subclasses draw their parameters with torch's generator (`draw`) and change one
    channel's content region as a float32 array in [0, 1] (`change`).
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def draw(self) -> dict[str, Any]:
        raise NotImplementedError

    def change(self, grey: np.ndarray, **params: Any) -> np.ndarray:
        raise NotImplementedError

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if float(torch.rand(())) >= self.p:
            return {"apply": False}
        return {"apply": True, **self.draw()}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"] or not _is_image(inpt):
            return inpt
        rows, cols = content_region(inpt)
        out = inpt.as_subclass(torch.Tensor).numpy().copy()
        changes = {key: value for key, value in params.items() if key != "apply"}
        for channel in out.reshape(-1, *out.shape[-2:]):
            if channel[rows, cols].size:
                channel[rows, cols] = self.change(np.ascontiguousarray(channel[rows, cols]),
                                                  **changes)
        changed = torch.from_numpy(out)
        return tv_tensors.wrap(changed, like=inpt) if isinstance(inpt, tv_tensors.Image) \
            else changed


class RandomWindow(_ContentChange):
    """Re-stretch between a random low and high percentile, each up to `tails` into its
    tail: the node windows a DICOM by its VOI window, or by its own 0.5-99.5 percentile
    range, and either clips a different share of the range than the export did."""

    def __init__(self, p: float, tails: float) -> None:
        super().__init__(p)
        self.tails = tails

    def draw(self) -> dict[str, Any]:
        return {"low": _uniform(0.0, self.tails), "high": 1.0 - _uniform(0.0, self.tails)}

    def change(self, grey: np.ndarray, *, low: float, high: float) -> np.ndarray:
        # One pixel in 16 is plenty for a random window, at a sixth of the cost.
        black, white = np.quantile(grey[::4, ::4], [low, high])
        if white - black < 1e-3:  # a flat image has no range to stretch
            return grey
        return np.clip((grey - black) / (white - black), 0.0, 1.0, dtype=np.float32)


class RandomGamma(_ContentChange):
    """grey ** g with g log-uniform in [1/gamma, gamma]: vendors' VOI LUTs and processing
    curves bend the grey scale differently from the export's; black stays black."""

    def __init__(self, p: float, gamma: float) -> None:
        super().__init__(p)
        self.log_gamma = math.log(gamma)

    def draw(self) -> dict[str, Any]:
        return {"gamma": math.exp(_uniform(-self.log_gamma, self.log_gamma))}

    def change(self, grey: np.ndarray, *, gamma: float) -> np.ndarray:
        return np.power(np.clip(grey, 0.0, 1.0), gamma, dtype=np.float32)


class RandomBitDepth(_ContentChange):
    """Quantised to 2**bits levels, bits uniform in [min_bits, 8]: exports are 8-bit
    (or coarser after windowing), DICOM 12-16-bit; left smooth when not drawn."""

    def __init__(self, p: float, min_bits: int) -> None:
        super().__init__(p)
        self.min_bits = min_bits

    def draw(self) -> dict[str, Any]:
        return {"levels": 2 ** int(torch.randint(self.min_bits, 9, ())) - 1}

    def change(self, grey: np.ndarray, *, levels: int) -> np.ndarray:
        return (np.round(grey * levels) / levels).astype(np.float32)


class RandomJpeg(_ContentChange):
    """Re-encoded as a JPEG of quality in [min_quality, 95]: the training exports carry
    JPEG artefacts, DICOM does not, so a model should not lean on them either way."""

    def __init__(self, p: float, min_quality: int) -> None:
        super().__init__(p)
        self.min_quality = min_quality

    def draw(self) -> dict[str, Any]:
        return {"quality": int(torch.randint(self.min_quality, 96, ()))}

    def change(self, grey: np.ndarray, *, quality: int) -> np.ndarray:
        eight_bit = np.round(np.clip(grey, 0.0, 1.0) * 255.0).astype(np.uint8)
        ok, encoded = cv2.imencode(".jpg", eight_bit, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode a {grey.shape} JPEG")
        return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255.0


class RandomSharpness(_ContentChange):
    """grey + a * (grey - blurred), a uniform in [-amount, amount]: a mild unsharp mask
    (DICOM originals are sharper, and vendors sharpen) or, below 0, a mild blur."""

    SIGMA = 1.0  # pixels of the model input: mild at any input size

    def __init__(self, p: float, amount: float) -> None:
        super().__init__(p)
        self.amount = amount

    def draw(self) -> dict[str, Any]:
        return {"amount": _uniform(-self.amount, self.amount)}

    def change(self, grey: np.ndarray, *, amount: float) -> np.ndarray:
        blurred = cv2.GaussianBlur(grey, (0, 0), self.SIGMA, borderType=cv2.BORDER_REFLECT)
        return np.clip(grey + amount * (grey - blurred), 0.0, 1.0, dtype=np.float32)


class RandomBorders(v2.Transform):
    """Uniform bright or dark bands on 1-4 sides of the content region, each up to
    `width` of its height or width: collimators and shutters leave them on DICOM, and
    exports are usually cropped to the anatomy.

    With boxes in the sample, every band stops short of the union of the boxes, so a
    fracture is never hidden; the boxes themselves pass through unchanged.
    """

    BRIGHT = (0.85, 1.0)  # unexposed detector under a collimator, windowed
    DARK = (0.0, 0.1)  # a shutter or Pixel Padding Value, shown black

    def __init__(self, p: float, width: float) -> None:
        super().__init__()
        self.p, self.width = p, width

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if float(torch.rand(())) >= self.p:
            return {"bands": []}
        image = next(inpt for inpt in flat_inputs if _is_image(inpt))
        rows, cols = content_region(image)
        # How far each side's band may reach before it meets a box: a top band ends
        # above every box, a bottom band starts below every box, and so on.
        top_end, bottom_start = rows.stop, rows.start
        left_end, right_start = cols.stop, cols.start
        for boxes in flat_inputs:
            if isinstance(boxes, tv_tensors.BoundingBoxes) and len(boxes):
                xyxy = v2.functional.convert_bounding_box_format(
                    boxes, new_format=tv_tensors.BoundingBoxFormat.XYXY)
                x0, y0 = xyxy[:, :2].amin(dim=0).tolist()
                x1, y1 = xyxy[:, 2:].amax(dim=0).tolist()
                top_end = min(top_end, math.floor(y0))
                bottom_start = max(bottom_start, math.ceil(y1))
                left_end = min(left_end, math.floor(x0))
                right_start = max(right_start, math.ceil(x1))
        sides = torch.randperm(4)[:int(torch.randint(1, 5, ()))].tolist()
        bright = float(torch.rand(())) < 0.5
        value = _uniform(*(self.BRIGHT if bright else self.DARK))
        bands = []
        for side in sides:
            extent = rows.stop - rows.start if side < 2 else cols.stop - cols.start
            reach = int(_uniform(0.0, self.width) * extent)
            if side == 0:
                band = (rows.start, min(rows.start + reach, top_end), cols.start, cols.stop)
            elif side == 1:
                band = (max(rows.stop - reach, bottom_start), rows.stop, cols.start, cols.stop)
            elif side == 2:
                band = (rows.start, rows.stop, cols.start, min(cols.start + reach, left_end))
            else:
                band = (rows.start, rows.stop, max(cols.stop - reach, right_start), cols.stop)
            if band[0] < band[1] and band[2] < band[3]:
                bands.append(band)
        return {"bands": bands, "value": value}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["bands"] or not _is_image(inpt):
            return inpt
        out = inpt.clone()
        for row0, row1, col0, col1 in params["bands"]:
            out[..., row0:row1, col0:col1] = params["value"]
        return out
