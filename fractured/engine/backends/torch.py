"""PyTorch backend: the reference implementation, and the GPU path where TensorRT is absent.

torch is an optional dependency of the node (the `train` extra): it is imported when this
backend is opened, never at module import, so a node that runs ONNX Runtime does not
pay for it. On CUDA the classifier runs in FP16 with channels-last memory, the layout
cuDNN's fastest convolution kernels want, replayed from a CUDA graph per batch size: eager
PyTorch launches each layer's kernels from Python, and on a fast GPU that launching, not
the arithmetic, is the time (docs/gpu/NOTES.md). The detector runs FP32 on CUDA with
cuDNN's TF32 convolutions turned off: with them its box scores moved further from the
CPU's than the 1e-3 the exported graphs are held to (tests/gpu/test_cuda.py). On the CPU
both run FP32 like the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fractured.engine.backends.base import Device
from fractured.engine.bundle import BundleError

log = structlog.get_logger()


def _torch():  # type: ignore[no-untyped-def]
    try:
        import torch
    except ImportError as exc:
        raise BundleError("the torch backend needs PyTorch: pip install 'fractured[train]'"
                          ) from exc
    return torch


class TorchClassifier:
    """FractureClassifier (or ClassifierEnsemble) weights, a state dict, run by PyTorch eager
    (on CUDA: FP16, channels-last, and a CUDA graph per batch size unless `cuda_graphs`
    is off)."""

    name = "torch"

    def __init__(self, weights: str | Path, *, variant: str, num_labels: int,
                 members: int = 1, device: Device = "auto",
                 threads: int | None = None, cuda_graphs: bool = True) -> None:
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
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, ...], _Graph | None] = {}

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
            x = x.to(self.device, dtype=self.dtype)
            if self.device.type != "cuda":
                logits, cam = self._model(x)
                return logits.numpy(), cam.numpy()
            x = x.contiguous(memory_format=torch.channels_last)
            graph = self._graph(x) if self.cuda_graphs else None
            if graph is None:
                logits, cam = self._model(x)
            else:
                graph.inputs.copy_(x)
                graph.graph.replay()
                logits, cam = graph.outputs
            return logits.float().cpu().numpy(), cam.float().cpu().numpy()

    def _graph(self, x: Any) -> _Graph | None:
        """The graph for x's shape, captured on first use (None where capture failed:
        that shape then runs eager, and the reason is logged once)."""
        shape = tuple(x.shape)
        if shape not in self._graphs:
            try:
                self._graphs[shape] = _capture(self._torch, self._model, x)
            except RuntimeError as exc:
                log.warning("engine.cuda_graph_failed", shape=list(shape), error=str(exc))
                self._graphs[shape] = None
        return self._graphs[shape]


@dataclass(frozen=True)
class _Graph:
    """A captured forward pass: copy a batch into `inputs`, replay, read `outputs`."""

    graph: Any  # torch.cuda.CUDAGraph
    inputs: Any  # the static input tensor the graph reads
    outputs: tuple[Any, Any]  # the static (logits, cam) tensors it writes


def _capture(torch, model, x) -> _Graph:  # type: ignore[no-untyped-def]
    """Capture model(x) as a CUDA graph, after warm-up passes on a side stream (cuDNN
    picks its kernels and the allocator settles before capture, as capture requires)."""
    inputs = x.clone()
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(3):
            model(inputs)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = model(inputs)
    return _Graph(graph, inputs, outputs)


class TorchDetector:
    """FractureDetector weights run by PyTorch eager, FP32 on CPU and CUDA alike (box
    regression and NMS are where FP16 would move boxes; the classifier takes FP16), with
    TF32 convolutions off while it runs."""

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
        tf32 = torch.backends.cudnn.allow_tf32
        try:
            torch.backends.cudnn.allow_tf32 = False
            with torch.inference_mode():
                x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
                boxes, scores, labels = self._model(x.to(self.device))
                return (boxes.float().cpu().numpy(), scores.float().cpu().numpy(),
                        labels.cpu().numpy())
        finally:
            torch.backends.cudnn.allow_tf32 = tf32


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
