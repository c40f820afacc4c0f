"""The interfaces every inference backend offers the pipeline: classifier and detector."""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

#: Where the torch backend runs: "auto" is a CUDA GPU when torch sees one, else the CPU.
Device = Literal["auto", "cpu", "cuda"]


class ClassifierBackend(Protocol):
    """Runs the exported classifier graph on a normalised batch.

    `run` takes a float32 (B, 3, size, size) batch and returns `(logits, cam)`: float32
    arrays of shape (B, N) and (B, N, h, w), N being the bundle's labels in manifest order.
    `name` is what logs and results report as the backend that ran.
    """

    name: str

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class DetectorBackend(Protocol):
    """Runs the exported fracture-box detector on the same normalised batch.

    `run` takes a float32 (B, 3, size, size) batch and returns `(boxes, scores, labels)`:
    float32 (B, K, 4) boxes (x0, y0, x1, y1) in model-input pixels, float32 (B, K) scores
    (best first) and int64 (B, K) labels, K being the detections per image fixed at
    export. Empty slots hold score 0 and label 0 (background); label i >= 1 is the
    bundle's i-th label.
    """

    name: str

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...
