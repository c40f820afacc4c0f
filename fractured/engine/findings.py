"""What the engine concludes about one image: plain data everything downstream is made from.

SR, Secondary Capture overlays, logs and metrics are all derived from these objects, so
they never disagree about what the model said.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fractured.engine.intended_use import ScopeCheck
from fractured.engine.regions import PointsRegion

if TYPE_CHECKING:  # exposed_field needs OpenCV; findings are plain data
    from fractured.engine.exposed_field import Field


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


class DecisionLevel(enum.StrEnum):
    """How strongly a score calls a fracture, as fracture products show it: a possible
    fracture (dotted box, "doubt") passed only the high-sensitivity threshold, a likely
    one (solid box) passed the high-specificity threshold too."""

    NEGATIVE = "negative"
    POSSIBLE = "possible"
    LIKELY = "likely"

    @property
    def verdict(self) -> str:
        """The level in the words every result says it with (SR summary and labels,
        overlay banners), so that no two of them word one decision differently."""
        return _VERDICTS[self]


_VERDICTS = {DecisionLevel.LIKELY: "likely fracture", DecisionLevel.POSSIBLE: "possible fracture",
             DecisionLevel.NEGATIVE: "no fracture found"}


@dataclass(frozen=True)
class OperatingPoints:
    """Two thresholds on a calibrated score, chosen on validation data by ML staff."""

    high_sensitivity: float
    high_specificity: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.high_sensitivity <= self.high_specificity <= 1.0:
            raise ValueError("operating points need 0 <= high_sensitivity <= "
                             f"high_specificity <= 1, got {self.high_sensitivity}, "
                             f"{self.high_specificity}")

    def level(self, score: float) -> DecisionLevel:
        if score >= self.high_specificity:
            return DecisionLevel.LIKELY
        if score >= self.high_sensitivity:
            return DecisionLevel.POSSIBLE
        return DecisionLevel.NEGATIVE


@dataclass(frozen=True)
class ImageRef:
    """The DICOM instance a finding is about (UIDs are empty for a PNG or JPEG input)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Box:
    """A detected fracture in source-image pixels: columns x0..x1, rows y0..y1."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    level: DecisionLevel
    label: str = "fracture"


@dataclass(frozen=True)
class Finding:
    """The engine's verdict on one source image.

    `probability` is the calibrated fracture probability and `level` its decision at
    the bundle's two operating points; `fracture` is the high-sensitivity decision (a
    possible fracture is worth a look). `heatmap` is the class activation map on the
    source's pixel grid (rows x columns, float32 in [0, 1]). `boxes` come from the
    detector, when the bundle has one, at or above its high-sensitivity point. `spread`
    is the standard deviation of the probability over test-time augmentations, when
    they were run. `operating_region` says whose operating points these are, where the
    bundle has points per body region: the image's region, or "pooled" (regions.POOLED)
    when the pooled pair applied; None when the bundle has only the pooled pair, which
    then needs no citing. `scope` is the image's intended-use check as the pipeline
    settled it: for an image whose header could not say what it shows, the region
    check's decision; one with `analyse` false is a verdict nobody may see.
    `analysed_field` is the rectangle of the image the classifier analysed (its exposed
    field, where the bundle crops to it); None: the whole image.
    """

    image: ImageRef
    probability: float
    operating_points: OperatingPoints
    heatmap: np.ndarray = field(repr=False)
    model: ModelInfo
    boxes: tuple[Box, ...] = ()
    spread: float | None = None
    operating_region: PointsRegion | None = None
    scope: ScopeCheck | None = None
    analysed_field: Field | None = None

    @property
    def level(self) -> DecisionLevel:
        return self.operating_points.level(self.probability)

    @property
    def fracture(self) -> bool:
        return self.level is not DecisionLevel.NEGATIVE


#: Decision levels from least to most: a study's level is the highest of its images'.
LEVEL_ORDER = (DecisionLevel.NEGATIVE, DecisionLevel.POSSIBLE, DecisionLevel.LIKELY)


def study_level(findings: Sequence[Finding]) -> DecisionLevel:
    """The study's decision: the highest level among its analysed images (a fracture
    seen on one view is a fracture of the study). ValueError without findings."""
    if not findings:
        raise ValueError("a study's level needs at least one finding")
    return max((finding.level for finding in findings), key=LEVEL_ORDER.index)


def study_verdict(findings: Sequence[Finding]) -> str:
    """The study's decision in words, with how it was combined, for the SR summary and
    the banners: e.g. "Study: likely fracture (the highest of its 3 analysed images:
    likely on 1, possible on 1)"."""
    levels = [finding.level for finding in findings]
    count = len(findings)
    how = ("its one analysed image" if count == 1 else
           f"the highest of its {count} analysed images: likely on "
           f"{levels.count(DecisionLevel.LIKELY)}, possible on "
           f"{levels.count(DecisionLevel.POSSIBLE)}")
    return f"Study: {study_level(findings).verdict} ({how})"
