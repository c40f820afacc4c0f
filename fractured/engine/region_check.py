"""The region check: where an image's header cannot say what it shows, the pixels do.

Body Part Examined is often empty, generic (EXTREMITY) or free text a modality made up,
and a PNG or JPEG has no header at all. For those images a bundle may carry a region
check (`region_check.onnx`, manifest `intended_use.region_check`, fitted by
`fractured build-engine`, see training.region_check): a graph that takes the
classifier's own input batch and returns, per image, a distance to each body-region
class of the training data (engine.regions.REGION_GROUPS, "other" for images of several
regions). The nearest class is the image's region; the nearest distance says how much
the image looks like any training image at all. An image farther than the threshold,
chosen so that a stated share of images the fit never saw falls within it (the
manifest's `validation.accepted_floor`), is unlike everything the model was measured on
(a chest film, an abdomen), and gets no verdict.

The graph runs on ONNX Runtime whatever backend runs the models (it runs only for the
images whose header cannot decide, one small network pass each); its distances are in
units only its own threshold gives meaning to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fractured.engine.regions import OTHER, REGION_GROUPS, Region

#: The bundle file of the region check's graph.
REGION_CHECK_FILE = "region_check.onnx"
#: Its output: (B, classes) distances, the manifest's `classes` in order.
DISTANCES_OUTPUT = "distances"


@dataclass(frozen=True)
class RegionCheck:
    """A bundle's region check: its classes, the familiarity threshold, and what it
    scored on validation (`validation`: images, accepted share, region accuracy)."""

    classes: tuple[str, ...]  # REGION_GROUPS values, in the graph's output order
    threshold: float  # the largest distance still like the training images
    backbone: str  # whose features it measures, e.g. "imagenet:efficientnet-lite0"
    validation: Mapping[str, Any]

    def __post_init__(self) -> None:
        unknown = [name for name in self.classes if name not in REGION_GROUPS]
        if not self.classes or unknown or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"region check classes must be distinct values of "
                             f"{', '.join(REGION_GROUPS)}, got {list(self.classes)}")
        if not self.threshold > 0:
            raise ValueError(f"the region check threshold must be positive, got "
                             f"{self.threshold}")

    def nearest(self, distances: np.ndarray) -> RegionSeen:
        """The class nearest to one image (its row of the graph's output)."""
        row = np.asarray(distances, dtype=np.float64).reshape(-1)
        if row.shape != (len(self.classes),):
            raise ValueError(f"expected {len(self.classes)} distances, got {row.shape}")
        index = int(np.argmin(row))
        group = self.classes[index]
        return RegionSeen(group=group, region=None if group == OTHER else Region(group),
                          distance=float(row[index]),
                          familiar=bool(row[index] <= self.threshold))


@dataclass(frozen=True)
class RegionSeen:
    """What the region check saw in one image."""

    group: str  # a REGION_GROUPS value
    region: Region | None  # None for "other" (several regions in one image)
    distance: float  # to the nearest class
    familiar: bool  # within the threshold: like the training images
