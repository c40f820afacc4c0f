"""PyTorch backend: the reference implementation, and the GPU path where TensorRT is absent.

torch is an optional dependency of the node (the `train` extra): it is imported when this
backend is opened, never at module import, so a node that runs ONNX Runtime does not
pay for it. On CUDA the model runs in FP16 with channels-last memory, the layout cuDNN's
fastest convolution kernels want; on the CPU it runs FP32 like the exported graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from fractured.engine.bundle import BundleError

Device = Literal["auto", "cpu", "cuda"]


def _torch():  # type: ignore[no-untyped-def]
    try:
        import torch
    except ImportError as exc:
        raise BundleError("the torch backend needs PyTorch: pip install 'fractured[train]'"
                          ) from exc
    return torch


class TorchClassifier:
    """FractureClassifier (or ClassifierEnsemble) weights, a state dict, run by PyTorch eager."""

    name = "torch"

    def __init__(self, weights: str | Path, *, variant: str, num_labels: int,
                 members: int = 1, device: Device = "auto",
                 threads: int | None = None) -> None:
        torch = _torch()
        from fractured.engine.models import build_classifier

        self.device = _device(torch, device)
        if threads is not None:
            torch.set_num_threads(threads)
        model = build_classifier(variant, num_labels, members)
        _load(torch, model, weights, f"{model.architecture} with {num_labels} label(s)")
        model.eval()
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        if self.device.type == "cuda":
            model = model.to(self.device, dtype=self.dtype, memory_format=torch.channels_last)
        self._model = model
        self._torch = torch

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(self.device, dtype=self.dtype)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            logits, cam = self._model(x)
            return (logits.float().cpu().numpy(), cam.float().cpu().numpy())


class TorchDetector:
    """FractureDetector weights run by PyTorch eager, FP32 on CPU and CUDA alike (box
    regression and NMS are where FP16 would move boxes; the classifier takes FP16)."""

    name = "torch"

    def __init__(self, weights: str | Path, *, backbone: str, num_labels: int, input_size: int,
                 detections_per_image: int, device: Device = "auto",
                 threads: int | None = None) -> None:
        torch = _torch()
        from fractured.engine.models import FractureDetector

        self.device = _device(torch, device)
        if threads is not None:
            torch.set_num_threads(threads)
        model = FractureDetector(backbone, num_labels=num_labels, input_size=input_size,
                                 detections_per_image=detections_per_image)
        _load(torch, model, weights, f"{model.architecture} with {num_labels} label(s)")
        self._model = model.eval().to(self.device)
        self._torch = torch

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            boxes, scores, labels = self._model(x)
            return (boxes.float().cpu().numpy(), scores.float().cpu().numpy(),
                    labels.cpu().numpy())


def _device(torch, requested: Device):  # type: ignore[no-untyped-def]
    if requested == "cuda" and not torch.cuda.is_available():
        raise BundleError("the torch backend was asked for CUDA, but no GPU is visible")
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def _load(torch, model, weights: str | Path, what: str) -> None:  # type: ignore[no-untyped-def]
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (OSError, RuntimeError, KeyError) as exc:
        raise BundleError(f"{weights}: not weights for {what} ({exc})") from exc
