"""Inference backends behind one interface, chosen by name or automatically.

Only ONNX Runtime exists so far; torch and TensorRT join the table below when they do.
"""

from __future__ import annotations

from fractured.engine.backends.base import ClassifierBackend
from fractured.engine.backends.onnxruntime import OnnxRuntimeClassifier
from fractured.engine.bundle import CLASSIFIER_FILE, Bundle, BundleError

BACKENDS = ("auto", "onnxruntime")

__all__ = ["BACKENDS", "ClassifierBackend", "OnnxRuntimeClassifier", "open_classifier"]


def open_classifier(bundle: Bundle, backend: str = "auto",
                    threads: int | None = None) -> ClassifierBackend:
    """Open the bundle's classifier with the named backend ("auto": the best one it holds).

    Raises ValueError for a backend name that does not exist (naming the valid ones) and
    BundleError when the bundle was not built for the requested backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if "onnxruntime" not in bundle.manifest.backends:
        raise BundleError(f"{bundle.path}: built for {', '.join(bundle.manifest.backends)}, "
                          f"not for onnxruntime")
    return OnnxRuntimeClassifier(bundle.file(CLASSIFIER_FILE), threads=threads)
