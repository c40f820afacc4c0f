"""Samples to tensors: decoded once, letterboxed as the node does, then augmented per epoch.

Every image goes through `engine.sources.load_image`, `engine.exposed_field.field_for`
(where `[data].crop` asks for it) and `engine.preprocess.letterbox`, the node's own door,
so a model is trained on exactly the pixels it will be given in service (MONOCHROME1
inverted, VOI applied, cropped alike, aspect kept). Decoding and resizing happen
once, up front, into an in-memory float16 array: on a 2-core machine decoding every
JPEG every epoch would cost more than the network's forward pass at 224 px.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from tqdm import tqdm

from fractured.engine.exposed_field import NO_CROP, field_for
from fractured.engine.preprocess import DecodeError, Letterbox, letterbox
from fractured.engine.sources import load_image
from fractured.training.datasets.base import Sample
from fractured.training.losses import IN_BOXES, NO_FRACTURE, UNSUPERVISED
from fractured.training.transforms import as_box_target, normalise

log = structlog.get_logger()


@dataclass(frozen=True)
class Letterboxed:
    """The decodable samples' images at model size, how each was fitted (for boxes), and
    the samples that could not be decoded with the reason."""

    samples: tuple[Sample, ...]
    images: np.ndarray  # (N, S, S) float16 in [0, 1], one per kept sample
    boxes: tuple[Letterbox, ...]
    unreadable: tuple[tuple[str, str], ...]  # (path, reason)

    def __len__(self) -> int:
        return len(self.samples)


def letterbox_samples(samples: Sequence[Sample], size: int, *, crop: str = NO_CROP,
                      threads: int = 2, desc: str = "decoding") -> Letterboxed:
    """Decode, crop (`crop`: an exposed_field.CROPS value, as the model's spec records)
    and letterbox every sample, leaving out the ones that cannot be decoded.

    Those are logged one by one and listed in `unreadable`, which the checkpoint and the
    evaluation report record. They are left out rather than repaired: FracAtlas has 51
    truncated JPEGs, all of them normal images, and decoding them leniently fills their
    missing bottom rows with flat grey, a shortcut a network would learn as "normal".
    """
    images = np.zeros((len(samples), size, size), dtype=np.float16)
    fits: list[Letterbox | None] = [None] * len(samples)
    reasons: list[str | None] = [None] * len(samples)

    def one(index: int) -> None:
        try:
            loaded = load_image(samples[index].path)
        except DecodeError as exc:
            reasons[index] = str(exc)
            return
        image, fit = letterbox(loaded.pixels, size,
                               field_for(crop, loaded.pixels, loaded.dataset))
        images[index] = image
        fits[index] = fit

    with ThreadPoolExecutor(max_workers=max(threads, 1)) as pool:
        for _ in tqdm(pool.map(one, range(len(samples))), total=len(samples), desc=desc,
                      unit="img", disable=None, mininterval=5.0):
            pass
    kept = [i for i, fit in enumerate(fits) if fit is not None]
    unreadable = tuple((str(samples[i].path), reason) for i, reason in enumerate(reasons)
                       if reason is not None)
    for path, reason in unreadable:
        log.warning("train.image_unreadable", path=path, reason=reason)
    return Letterboxed(tuple(samples[i] for i in kept), images[kept],
                       tuple(fits[i] for i in kept if fits[i] is not None), unreadable)


def crop_entry(crop: str) -> dict[str, str]:
    """What a checkpoint's model_spec says of `crop`: nothing for "none", so a model
    trained whole reads (and resumes) like those trained before crops existed."""
    return {} if crop == NO_CROP else {"crop": crop}


def trained_crop(spec: Mapping[str, Any]) -> str:
    """The crop a checkpoint's model_spec (or an ensemble member's) was trained with."""
    return str(spec.get("crop", NO_CROP))


def model_boxes(sample: Sample, fit: Letterbox) -> np.ndarray:
    """A sample's boxes in model-input pixels (M, 4), x0 y0 x1 y1.

    Each box is first clipped to the source rectangle that was letterboxed (its exposed
    field, or the whole image); a box wholly outside it marks nothing the model sees
    and is left out.
    """
    region = fit.region
    rows = []
    for box in sample.boxes or ():
        left = min(max(box.x0 * fit.src_cols, region.left), region.right)
        right = min(max(box.x1 * fit.src_cols, region.left), region.right)
        top = min(max(box.y0 * fit.src_rows, region.top), region.bottom)
        bottom = min(max(box.y1 * fit.src_rows, region.top), region.bottom)
        if right <= left or bottom <= top:
            continue
        x0, y0 = fit.point_to_model(left, top)
        x1, y1 = fit.point_to_model(right, bottom)
        rows.append((x0, y0, x1, y1))
    return np.asarray(rows, dtype=np.float32).reshape(-1, 4)


class ClassifierImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(image (3, S, S), label) pairs; `transform` augments the grey image first."""

    def __init__(self, data: Letterboxed, *, mean: Sequence[float], std: Sequence[float],
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.data = data
        self.labels = torch.as_tensor([s.label for s in data.samples], dtype=torch.float32)
        self.mean, self.std, self.transform = tuple(mean), tuple(std), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        grey = tv_tensors.Image(torch.from_numpy(self.data.images[index].astype(np.float32)))
        if self.transform is not None:
            grey = self.transform(grey)
        return normalise(grey.as_subclass(torch.Tensor), self.mean, self.std), self.labels[index]


class BoxedClassifierImages(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                          torch.Tensor]]):
    """(image, label, box mask (S, S) uint8, kind) for box supervision of the CAM.

    Boxes go through the same (box-aware) augmentation as their pixels. `kind` says how
    the mask is to be read (losses.BoxSupervision): NO_FRACTURE (a normal image: every
    cell is cold), IN_BOXES (a fractured image with boxes: the cells under them are hot,
    the others free), UNSUPERVISED (a fractured image whose boxes are unknown or empty).
    """

    def __init__(self, data: Letterboxed, *, mean: Sequence[float], std: Sequence[float],
                 transform: Callable[..., object]) -> None:
        self.data = data
        self.boxes = [model_boxes(sample, fit)
                      for sample, fit in zip(data.samples, data.boxes, strict=True)]
        self.kinds = [NO_FRACTURE if sample.label == 0 else
                      IN_BOXES if sample.boxes else UNSUPERVISED for sample in data.samples]
        self.mean, self.std, self.transform = tuple(mean), tuple(std), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
        grey = tv_tensors.Image(torch.from_numpy(self.data.images[index].astype(np.float32)))
        size = grey.shape[-1]
        boxes = torch.from_numpy(self.boxes[index])
        target = as_box_target(boxes, torch.ones(len(boxes), dtype=torch.int64), size)
        grey, target = self.transform(grey, target)  # type: ignore[misc]
        mask = torch.zeros(size, size, dtype=torch.uint8)
        for x0, y0, x1, y1 in target["boxes"].as_subclass(torch.Tensor).tolist():
            mask[max(int(y0), 0):max(int(np.ceil(y1)), 0),
                 max(int(x0), 0):max(int(np.ceil(x1)), 0)] = 1
        kind = self.kinds[index]
        if kind == IN_BOXES and not mask.any():  # augmentation pushed every box out
            kind = UNSUPERVISED
        label = torch.tensor(float(self.data.samples[index].label))
        return (normalise(grey.as_subclass(torch.Tensor), self.mean, self.std), label, mask,
                torch.tensor(kind))


class DetectorImages(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """(image (3, S, S), {"boxes": (M, 4) model pixels, "labels": (M,)}) pairs.

    Label 1 is the bundle's first label ("fracture"); 0 is torchvision's background.
    An image without boxes is a negative example (M = 0), which torchvision supports.
    """

    def __init__(self, data: Letterboxed, *, mean: Sequence[float], std: Sequence[float],
                 transform: Callable[..., object] | None = None) -> None:
        self.data = data
        self.boxes = [model_boxes(sample, fit)
                      for sample, fit in zip(data.samples, data.boxes, strict=True)]
        self.mean, self.std, self.transform = tuple(mean), tuple(std), transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        grey = tv_tensors.Image(torch.from_numpy(self.data.images[index].astype(np.float32)))
        boxes = torch.from_numpy(self.boxes[index])
        target = as_box_target(boxes, torch.ones(len(boxes), dtype=torch.int64),
                               grey.shape[-1])
        if self.transform is not None:
            grey, target = self.transform(grey, target)  # type: ignore[misc]
        return (normalise(grey.as_subclass(torch.Tensor), self.mean, self.std),
                {"boxes": target["boxes"].as_subclass(torch.Tensor).float(),
                 "labels": target["labels"]})


def collate_detection(batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
                      ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Images stacked (they share a size), targets kept as a list (their lengths differ)."""
    return torch.stack([image for image, _ in batch]), [target for _, target in batch]
