"""What every dataset reader produces: samples with labels, groups and boxes, nothing read yet.

Readers only parse a layout (folders, label files, CSV, JSON) and never decode pixels, so
opening a 40,000-image set takes seconds; pixels are read per sample by the training
data loader through `engine.sources.load_image`, the same door the node uses.

A reader keeps everything that decides a fair split: the patient and study an image
belongs to (when the format knows them), its body part, and any split the dataset
ships with. Losing those is how public fracture scores end up with one patient's
X-rays on both sides of a train/test line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset whose layout or labels cannot be read; the message names the file and why."""


@dataclass(frozen=True)
class BoxLabel:
    """A ground-truth box, normalised to the image: 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1.

    Normalised coordinates let a reader give boxes without decoding the image to learn
    its size; the data loader scales them to the pixels it actually decoded.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    label: str = "fracture"

    def __post_init__(self) -> None:
        if not (0.0 <= self.x0 < self.x1 <= 1.0 and 0.0 <= self.y0 < self.y1 <= 1.0):
            raise ValueError(f"box ({self.x0}, {self.y0}, {self.x1}, {self.y1}) is not a "
                             "non-empty box inside the image (normalised coordinates)")


@dataclass(frozen=True)
class Sample:
    """One image and what is known about it.

    `label` is the binary fracture target (1 = fracture / abnormal). `boxes` is None when
    the format has no boxes for this image (unknown), and an empty tuple when it says
    there are none. `patient` and `study` are "" when unknown; `split` is the split the
    dataset ships with ("train", "val", "test") or None. `attributes` keeps any other
    column the format has (e.g. FracAtlas's `hardware`), as text, for subset metrics.
    """

    path: Path
    label: int
    body_part: str = ""
    patient: str = ""
    study: str = ""
    boxes: tuple[BoxLabel, ...] | None = None
    split: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise ValueError(f"{self.path}: label must be 0 or 1, got {self.label!r}")
        if self.split is not None and self.split not in SPLITS:
            raise ValueError(f"{self.path}: split must be one of {SPLITS}, got {self.split!r}")


@dataclass(frozen=True)
class SampleSet:
    """A whole dataset: its format, where it lives, and its samples in a stable order."""

    format: str
    root: Path
    samples: tuple[Sample, ...]
    box_labels: tuple[str, ...] = ("fracture",)

    @property
    def has_boxes(self) -> bool:
        """Whether any sample carries box annotations (detector training needs them)."""
        return any(sample.boxes is not None for sample in self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def is_image(path: Path) -> bool:
    """A file the readers treat as an image, by suffix (case-insensitive)."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
