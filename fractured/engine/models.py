"""The fracture classifier: EfficientNet features, a spatial attention gate and a CAM head.

The class activation map is computed inside the network (a 1x1 linear head applied at
every location) rather than from gradients afterwards, so the exported ONNX/TensorRT
graphs return the same heatmap as PyTorch, and the logits are by construction its mean:
the heatmap shows exactly what the score was made of.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision import models as tv_models

# The resolution each EfficientNet variant was designed for (Tan & Le 2019, as in
# torchvision's weight transforms); the default input size of a bundle built from it.
INPUT_SIZES: dict[str, int] = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380}

_BACKBONES: dict[str, Callable[..., tv_models.EfficientNet]] = {
    "b0": tv_models.efficientnet_b0,
    "b1": tv_models.efficientnet_b1,
    "b2": tv_models.efficientnet_b2,
    "b3": tv_models.efficientnet_b3,
    "b4": tv_models.efficientnet_b4,
}


class FractureClassifier(nn.Module):
    """Multi-label image classifier whose logits are the spatial mean of its CAM.

    `forward` returns `(logits, cam)`: logits (B, N) and cam (B, N, h, w) with h, w the
    backbone's output grid (input / 32). The attention gate lets the network suppress
    regions (collimator edges, text burnt into the image) before pooling, which also
    keeps them cold in the heatmap.
    """

    def __init__(self, variant: str = "b0", num_labels: int = 1) -> None:
        super().__init__()
        if variant not in _BACKBONES:
            raise ValueError(f"unknown EfficientNet variant {variant!r}; "
                             f"choose one of {', '.join(_BACKBONES)}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        self.variant = variant
        self.num_labels = num_labels
        # No pretrained weights can be fetched on the build hosts, and a silent download
        # would make builds irreproducible: weights are always trained here from scratch.
        backbone = _BACKBONES[variant](weights=None)
        channels = backbone.classifier[-1].in_features
        self.features = backbone.features
        hidden = max(channels // 8, 1)
        self.attention = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, kernel_size=1),
            nn.Sigmoid(),
        )
        self.head = nn.Conv2d(channels, num_labels, kernel_size=1)

    @property
    def architecture(self) -> str:
        """The name recorded in a bundle's manifest."""
        return f"efficientnet_{self.variant}+attention"

    def gated_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features multiplied by the attention map, (B, C, h, w)."""
        features = self.features(x)
        return features * self.attention(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.head(self.gated_features(x))
        # mean(W f + b) over locations == W mean(f) + b: the usual pool-then-linear
        # classifier, with its per-location terms kept as the heatmap.
        logits = cam.mean(dim=(2, 3))
        return logits, cam
