"""Training augmentation (torchvision transforms v2), box-aware for the detector.

Augmentation runs on the letterboxed grey image the model sees, (1, S, S) in [0, 1],
before normalisation, so a rotated or zoomed image keeps black (air) in its corners as
real letterboxed input does. Boxes travel through the same geometric transforms as
their pixels (v2's BoundingBoxes), and boxes pushed out of the image are dropped.
Validation and test images are never augmented.
"""

from __future__ import annotations

from collections.abc import Sequence

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
    if settings.brightness > 0 or settings.contrast > 0:
        steps.append(v2.ColorJitter(brightness=settings.brightness or None,
                                    contrast=settings.contrast or None))
    if boxes:
        # Drops boxes that a rotation or zoom pushed (almost) out of the image, with
        # their labels, so the detector is never asked to find what is not there.
        steps.append(v2.SanitizeBoundingBoxes(min_size=2.0))
    return v2.Compose(steps)


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
