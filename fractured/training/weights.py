"""Initial weights for a run: a local file first (hospitals are often offline), or a
torchvision weights name where the internet is reachable.

Accepted files: a fractured checkpoint (fine-tune a model we trained), or a plain state
dict of the torchvision architecture (e.g. ImageNet EfficientNet features, COCO Faster
R-CNN). A ResNet classifier's checkpoint also starts a ResNet-FPN detector: its
backbone layers are renamed to the detector's (`features.4.` -> `backbone.body.layer1.`).
Only layers whose names and shapes match are taken, and the count taken is logged; a
file that matches nothing is an error rather than a silent random start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from fractured.config import ConfigError

log = structlog.get_logger()


def load_initial_weights(module: nn.Module, source: str, *, where: str) -> int:
    """Copy matching tensors from `source` into `module`; returns how many were copied.

    `where` names the config key in errors (e.g. "[classifier].initial_weights")."""
    state = _read(source, where)
    state = state | _as_detector_backbone(state)
    own = module.state_dict()
    taken = {key: value for key, value in state.items()
             if key in own and tuple(own[key].shape) == tuple(value.shape)}
    if not taken:
        raise ConfigError(f"{where}: {source} has no tensor matching this model "
                          f"(is it for another architecture?)")
    module.load_state_dict(taken, strict=False)
    log.info("train.initial_weights", source=source, tensors=len(taken), of=len(own))
    return len(taken)


def _read(source: str, where: str) -> dict[str, torch.Tensor]:
    path = Path(source).expanduser()
    if path.is_file():
        try:
            content: Any = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for damaged/foreign files
            raise ConfigError(f"{where}: {path} is not a readable weights file ({exc})") from exc
        if isinstance(content, dict) and "format_version" in content and "model" in content:
            content = content["model"]  # a fractured checkpoint
        if not isinstance(content, dict):
            raise ConfigError(f"{where}: {path} holds no state dict")
        return _strip_prefix(content)
    if "_Weights." in source:
        from torchvision.models import get_weight

        try:
            weights = get_weight(source)
        except (ValueError, KeyError) as exc:
            raise ConfigError(f"{where}: {source} is not a torchvision weights name") from exc
        try:
            return weights.get_state_dict(progress=False)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot fetch {source} ({exc}); offline hosts need "
                              "a local weights file path") from exc
    raise ConfigError(f"{where}: {source} is neither a file nor a torchvision weights name")


# FractureClassifier's ResNet `features` (conv1, bn1, relu, maxpool, layer1..4 in a
# Sequential) and where each lives in a torchvision ResNet-FPN Faster R-CNN.
_RESNET_FEATURES_IN_DETECTOR = {"features.0.": "backbone.body.conv1.",
                                "features.1.": "backbone.body.bn1.",
                                "features.4.": "backbone.body.layer1.",
                                "features.5.": "backbone.body.layer2.",
                                "features.6.": "backbone.body.layer3.",
                                "features.7.": "backbone.body.layer4."}


def _as_detector_backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ResNet classifier's backbone tensors under a ResNet-FPN detector's names (empty
    for anything else; EfficientNet keys have other indices and shapes and match nothing)."""
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix, target in _RESNET_FEATURES_IN_DETECTOR.items():
            if key.startswith(prefix):
                renamed[target + key.removeprefix(prefix)] = value
    return renamed


def _strip_prefix(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop the `module.` prefix DataParallel-saved weights carry."""
    return {key.removeprefix("module."): value for key, value in state.items()
            if isinstance(value, torch.Tensor)}
