"""Build engine bundles: export the classifier to ONNX, prove it matches, write the bundle.

Every bundle is checked before it is written: the exported graph must give the same
logits and CAM as the PyTorch model it came from, so no backend difference can reach
a patient's result unnoticed.
"""

from __future__ import annotations

import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fractured.engine.backends.onnxruntime import INPUT_NAME, OUTPUT_NAMES, OnnxRuntimeClassifier
from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    FRACTURE_LABEL,
    SCHEMA_VERSION,
    TASK_CLASSIFICATION,
    write_bundle,
)
from fractured.engine.models import INPUT_SIZES, FractureClassifier

# ImageNet statistics: the convention torchvision backbones are built around, kept so
# that pretrained weights could be dropped in without changing the preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-3


class BuildError(Exception):
    """An export that cannot be trusted (the message gives the measured difference)."""


def build_untrained_bundle(out_dir: Path, *, name: str = "fractured-untrained",
                           version: str = "0.0.0", variant: str = "b0",
                           input_size: int | None = None, seed: int = 0) -> Path:
    """Build a bundle with random weights, for wiring and tests before a model is trained.

    `input_size` defaults to the variant's native size (224 for b0). The manifest says
    trained=false, which every result made with it shows as "UNTRAINED MODEL".
    """
    size = INPUT_SIZES[variant] if input_size is None else input_size
    if size < 32:
        raise ValueError(f"input_size must be at least 32 (the backbone's stride), got {size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FractureClassifier(variant=variant, num_labels=1)
        calibrate_batchnorm(model, size)
        with tempfile.TemporaryDirectory(prefix="fractured-build-") as scratch:
            onnx_path = Path(scratch) / CLASSIFIER_FILE
            export_classifier(model, onnx_path, size)
            check_parity(model, onnx_path, size)
            write_bundle(out_dir, {
                "schema_version": SCHEMA_VERSION,
                "name": name,
                "version": version,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "trained": False,
                "task": TASK_CLASSIFICATION,
                "labels": [FRACTURE_LABEL],
                "input_size": size,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
                "temperature": 1.0,
                "threshold": 0.5,
                "architecture": model.architecture,
                "backends": ["onnxruntime"],
                "training": {"note": "random weights, never trained", "seed": seed},
            }, {CLASSIFIER_FILE: onnx_path})
    return Path(out_dir)


def calibrate_batchnorm(model: nn.Module, input_size: int, batches: int = 4,
                        batch_size: int = 8) -> None:
    """Give untrained BatchNorm layers running statistics from random batches.

    Fresh BatchNorm layers (mean 0, variance 1) leave a random EfficientNet in eval
    mode outputting ~1e-19, which makes every probability 0.5 and every backend
    comparison meaningless. A cumulative average (momentum None) over a few train-mode
    batches sets usable statistics; the model is left in eval mode.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch_size, 3, input_size, input_size))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def export_classifier(model: FractureClassifier, path: Path, input_size: int) -> None:
    """Export to ONNX with a dynamic batch axis: input `image`, outputs `logits`, `cam`.

    The TorchScript (legacy) exporter is used: for this model it takes ~0.5 s and
    writes one self-contained file, while the dynamo exporter took ~8 s and splits the
    weights into a side file unless told not to; both graphs ran equally fast in ONNX
    Runtime and matched torch to ~1e-6. If the legacy exporter is removed, switch to
    `dynamo=True, external_data=False, verbose=False` with a `dynamic_shapes` batch Dim.
    """
    model.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        # It warns that it is deprecated (twice, from different places); that is known
        # and decided above, and would otherwise repeat in every build's output.
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )


def check_parity(model: FractureClassifier, onnx_path: Path, input_size: int,
                 tolerance: float = PARITY_TOLERANCE) -> tuple[float, float]:
    """Compare ONNX Runtime with torch on a random batch of 2; BuildError if they differ.

    A batch of 2 (the export example had 1) also proves the batch axis is dynamic.
    Returns the largest absolute differences on logits and on the CAM.
    """
    batch = torch.randn(2, 3, input_size, input_size)
    model.eval()
    with torch.no_grad():
        logits, cam = (tensor.numpy() for tensor in model(batch))
    onnx_logits, onnx_cam = OnnxRuntimeClassifier(onnx_path).run(batch.numpy())
    logits_diff = float(np.max(np.abs(onnx_logits - logits)))
    cam_diff = float(np.max(np.abs(onnx_cam - cam)))
    if not (logits_diff <= tolerance and cam_diff <= tolerance):
        raise BuildError(f"{onnx_path}: ONNX Runtime differs from torch by {logits_diff:.3g} "
                         f"on logits and {cam_diff:.3g} on the CAM (tolerance {tolerance:g})")
    return logits_diff, cam_diff
