"""The one interface every inference backend offers the pipeline."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ClassifierBackend(Protocol):
    """Runs the exported classifier graph on a normalised batch.

    `run` takes a float32 (B, 3, size, size) batch and returns `(logits, cam)`: float32
    arrays of shape (B, N) and (B, N, h, w), N being the bundle's labels in manifest order.
    `name` is what logs and results report as the backend that ran.
    """

    name: str

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
