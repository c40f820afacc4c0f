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
    """FractureClassifier weights (a state dict) run by PyTorch eager."""

    name = "torch"

    def __init__(self, weights: str | Path, *, variant: str, num_labels: int,
                 device: Device = "auto", threads: int | None = None) -> None:
        torch = _torch()
        from fractured.engine.models import FractureClassifier

        if device == "cuda" and not torch.cuda.is_available():
            raise BundleError("the torch backend was asked for CUDA, but no GPU is visible")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if threads is not None:
            torch.set_num_threads(threads)
        model = FractureClassifier(variant=variant, num_labels=num_labels)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except (OSError, RuntimeError, KeyError) as exc:
            raise BundleError(f"{weights}: not weights for {model.architecture} with "
                              f"{num_labels} label(s) ({exc})") from exc
        model.eval()
        self.device = torch.device("cuda" if use_cuda else "cpu")
        self.dtype = torch.float16 if use_cuda else torch.float32
        if use_cuda:
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
