"""The classifier's loss: binary cross-entropy plus a focal term (Lin et al. 2017).

Fractures are the minority (574 of 3,268 FracAtlas images) and many negatives are
easy; the focal term down-weights well-classified images by (1 - p_t)^gamma so the
subtle fractures keep driving the gradient, while plain cross-entropy keeps the
probabilities calibratable. `pos_weight` (negatives / positives on the training split,
when class weights are chosen) rebalances both terms.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FractureLoss(nn.Module):
    """BCE + focal_weight * focal, averaged over the batch; logits and targets (B,)."""

    def __init__(self, *, focal_weight: float = 0.5, gamma: float = 2.0,
                 pos_weight: float | None = None) -> None:
        super().__init__()
        if focal_weight < 0 or gamma < 0:
            raise ValueError(f"focal_weight and gamma must be >= 0, got {focal_weight}, {gamma}")
        if pos_weight is not None and pos_weight <= 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        self.focal_weight = focal_weight
        self.gamma = gamma
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        targets = targets.float()
        per_image = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        weight = (torch.ones_like(targets) if self.pos_weight is None
                  else 1.0 + (self.pos_weight - 1.0) * targets)
        loss = per_image
        if self.focal_weight > 0:
            # p_t is the probability given to the true class; exp(-BCE) computes it
            # without a separate sigmoid (and stays finite for large logits).
            p_true = torch.exp(-per_image)
            loss = loss + self.focal_weight * (1.0 - p_true) ** self.gamma * per_image
        return (weight * loss).mean()


#: What BoxSupervision is told about an image (data.BoxedClassifierImages sets it).
NO_FRACTURE, IN_BOXES, UNSUPERVISED = 0, 1, -1


class BoxSupervision(nn.Module):
    """Teaches the class activation map where fractures are, from the boxes.

    The CAM has one logit per cell of the backbone's grid (input / 32); the image logit
    is their mean. For a normal image every cell is pushed towards "no fracture"; for a
    fractured image with boxes, every cell a box touches is pushed towards "fracture",
    and the cells outside its boxes are left free (a fracture elsewhere may be
    unlabelled); a fractured image without boxes adds nothing. The per-cell binary
    cross-entropy is averaged over the supervised cells.
    """

    def forward(self, cam: torch.Tensor, masks: torch.Tensor,
                kinds: torch.Tensor) -> torch.Tensor:
        """cam (B, h, w) logits; masks (B, S, S) box pixels; kinds (B,) as above."""
        cam = cam.float()
        hot = F.adaptive_max_pool2d(masks[:, None].float(), cam.shape[-2:])[:, 0]
        normal = (kinds == NO_FRACTURE)[:, None, None].expand_as(cam)
        boxed = (kinds == IN_BOXES)[:, None, None] & (hot > 0)
        supervised = normal | boxed
        if not supervised.any():
            return cam.sum() * 0.0
        target = boxed.float()
        per_cell = F.binary_cross_entropy_with_logits(cam, target, reduction="none")
        return per_cell[supervised].mean()
