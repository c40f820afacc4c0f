"""What the engine concludes about one image: plain data everything downstream is made from.

SR, Secondary Capture overlays, logs and metrics are all derived from these objects, so
they never disagree about what the model said.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """The engine bundle that produced a finding (named in every result object)."""

    name: str
    version: str
    trained: bool

    @property
    def label(self) -> str:
        """`name version`, with a loud marker when the weights were never trained."""
        text = f"{self.name} {self.version}"
        return text if self.trained else f"{text} (UNTRAINED MODEL)"


@dataclass(frozen=True)
class ImageRef:
    """The DICOM instance a finding is about."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Finding:
    """The classifier's verdict on one source image.

    `probability` is the calibrated fracture probability; `fracture` is the decision at
    the bundle's operating threshold. `heatmap` is the class activation map resampled to
    the source image's pixel grid (rows x columns, float32 in [0, 1]), so an overlay or a
    measurement can use it without knowing the model's input size.
    """

    image: ImageRef
    probability: float
    threshold: float
    heatmap: np.ndarray = field(repr=False)
    model: ModelInfo

    @property
    def fracture(self) -> bool:
        return self.probability >= self.threshold
