"""Inference backends behind one interface, chosen by name or automatically.

"auto" takes the fastest backend this machine and the bundle both have: TensorRT (a GPU,
the tensorrt package and plans built for them); then ONNX Runtime where it has its CUDA
provider; then PyTorch on a CUDA GPU (a bundle with torch weights: FP16 channels-last,
faster on any GPU than ONNX Runtime on the CPU); then ONNX Runtime on the CPU, then
PyTorch on the CPU. The choice is made once per bundle and reported (`LoadedModels.backend`),
so logs and results can say what ran.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import structlog

from fractured.engine.backends.base import ClassifierBackend, DetectorBackend, Device
from fractured.engine.bundle import (
    BACKENDS,
    CLASSIFIER_FILE,
    CLASSIFIER_PLAN,
    CLASSIFIER_WEIGHTS,
    DETECTOR_FILE,
    DETECTOR_PLAN,
    DETECTOR_WEIGHTS,
    Bundle,
    BundleError,
)
from fractured.engine.region_check import REGION_CHECK_FILE

if TYPE_CHECKING:
    from fractured.engine.backends.onnxruntime import OnnxRuntimeRegionCheck

BackendName = Literal["auto", "onnxruntime", "torch", "tensorrt"]
#: What a node may ask for: a bundle's backends (engine.bundle.BACKENDS), or "auto".
BACKEND_CHOICES: tuple[str, ...] = ("auto", *BACKENDS)
log = structlog.get_logger()

__all__ = ["BACKEND_CHOICES", "ClassifierBackend", "DetectorBackend", "Device", "LoadedModels",
           "choose_backend", "open_models"]


@dataclass(frozen=True)
class LoadedModels:
    """The bundle's models, opened on one backend (the detector only if it has one)."""

    backend: str
    classifier: ClassifierBackend
    detector: DetectorBackend | None
    #: the intended use's region check, on ONNX Runtime whatever `backend` is
    region_check: OnnxRuntimeRegionCheck | None = None


def choose_backend(bundle: Bundle, requested: str = "auto", device: Device = "auto") -> str:
    """The backend to run `bundle` with; BundleError says why a requested one cannot.
    `device` is where torch would run: "cpu" keeps "auto" off the GPU."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"unknown backend {requested!r}; choose one of "
                         f"{', '.join(BACKEND_CHOICES)}")
    held = bundle.manifest.backends
    if requested != "auto":
        if requested not in held:
            raise BundleError(f"{bundle.path}: built for {', '.join(held)}, not {requested}")
        if requested == "tensorrt":
            from fractured.engine.backends.tensorrt import unavailable_reason

            if reason := unavailable_reason() or _plans_unusable(bundle):
                raise BundleError(f"tensorrt backend unavailable: {reason}")
        return requested
    if "tensorrt" in held:
        from fractured.engine.backends.tensorrt import unavailable_reason

        if unavailable_reason() is None:
            if (reason := _plans_unusable(bundle)) is None:
                return "tensorrt"
            # the plans were built for another GPU or TensorRT: the next backend runs
            log.warning("engine.tensorrt_plans_skipped", bundle=str(bundle.path),
                        reason=reason)
    if "torch" in held and device != "cpu" and _torch_sees_a_gpu() and not (
            "onnxruntime" in held and _onnxruntime_has_cuda()):
        return "torch"
    for name in ("onnxruntime", "torch"):
        if name in held:
            return name
    raise BundleError(f"{bundle.path}: no backend this node can run ({', '.join(held)})")


def _plans_unusable(bundle: Bundle) -> str | None:
    """Why the bundle's TensorRT plans cannot run on this machine's GPU (built for another
    TensorRT version or compute capability), or None; asked where TensorRT is present.
    Another GPU model of the same capability runs them, with a warning."""
    from fractured.engine.backends.tensorrt import PlanTarget, plan_is_usable

    built_for = bundle.manifest.tensorrt
    assert built_for is not None  # Manifest.from_dict requires it with the backend
    usable, message = plan_is_usable(PlanTarget(**built_for), PlanTarget.current())
    if usable and message:
        log.warning("engine.tensorrt_plans_for_another_gpu", bundle=str(bundle.path),
                    note=message)
    return None if usable else message


def _torch_sees_a_gpu() -> bool:
    """Whether torch is installed and sees a CUDA GPU. Asked only of a bundle with torch
    weights, so a node running a shipped (ONNX-only) bundle never imports torch."""
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _onnxruntime_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def open_models(bundle: Bundle, backend: str = "auto", threads: int | None = None,
                 device: Device = "auto") -> LoadedModels:
    """Open the classifier (and detector) of `bundle` on the chosen backend, and its
    region check where its intended use has one."""
    engines = _open_backends(bundle, backend, threads, device)
    use = bundle.manifest.intended_use
    if use is None or use.region_check is None:
        return engines
    from fractured.engine.backends.onnxruntime import OnnxRuntimeRegionCheck

    return replace(engines, region_check=OnnxRuntimeRegionCheck(
        bundle.file(REGION_CHECK_FILE), threads))


def _open_backends(bundle: Bundle, backend: str, threads: int | None,
                 device: Device) -> LoadedModels:
    name = choose_backend(bundle, backend, device)
    spec = bundle.manifest.detector
    if name == "onnxruntime":
        from fractured.engine.backends.onnxruntime import (
            OnnxRuntimeClassifier,
            OnnxRuntimeDetector,
        )

        return LoadedModels(name, OnnxRuntimeClassifier(bundle.file(CLASSIFIER_FILE), threads),
                       OnnxRuntimeDetector(bundle.file(DETECTOR_FILE), threads)
                       if spec else None)
    if name == "torch":
        from fractured.engine.backends.torch import TorchClassifier, TorchDetector

        c = bundle.manifest.classifier
        classifier = TorchClassifier(bundle.file(CLASSIFIER_WEIGHTS), variant=c.variant,
                                     num_labels=len(c.labels), members=c.members,
                                     device=device, threads=threads)
        return LoadedModels(name, classifier,
                            TorchDetector(bundle.file(DETECTOR_WEIGHTS), backbone=spec.backbone,
                                          num_labels=len(spec.labels),
                                          input_size=spec.input_size,
                                          detections_per_image=spec.detections_per_image,
                                          device=device, threads=threads) if spec else None)
    from fractured.engine.backends.tensorrt import TensorRTClassifier, TensorRTDetector

    return LoadedModels(name, TensorRTClassifier(bundle.file(CLASSIFIER_PLAN)),
                   TensorRTDetector(bundle.file(DETECTOR_PLAN)) if spec else None)
