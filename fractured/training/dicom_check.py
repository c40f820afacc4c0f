"""Does a bundle say the same of an image stored as DICOM as of its JPEG export?

The models learn from JPEG exports (FracAtlas: 8-bit, already windowed); the node reads
12-16-bit DICOM, windows it itself (engine.preprocess.display_pixels), inverts
MONOCHROME1 and meets collimation borders. `fractured check-dicom` writes each image of
a split part again as a 12-bit DICOM file in the ways modalities store it, reads it back
through the node's own reader (`engine.sources.load_image`) and compares the bundle's
probability with the one it gives the JPEG:

- `windowed`: the grey levels spread over 12 bits (in [400, 3400], dithered within each
  8-bit step, as a finer original would be) with a window that shows exactly that range;
- `full_range`: the same values without a window (the reader stretches the 0.5-99.5 %
  range, as a viewer's automatic window does);
- `monochrome1`: stored inverted (white = air) with the window, as many CR systems do;
- `collimated`: windowed, within bright bands (10 % of the width on each side, 6 % of
  the height at the top: what collimator blades leave) and no attribute naming them.

No label is read: it measures agreement, not accuracy, so running it on the test part
is not a look at the test part's performance.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fractured.engine.findings import ImageRef
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import load_image
from fractured.training.datasets.base import Sample

log = structlog.get_logger()

VARIANTS = ("windowed", "full_range", "monochrome1", "collimated")
#: Digital X-Ray Image Storage - For Presentation
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
#: Where the 8-bit grey levels land in 12 bits: not the full range, as in a real exposure
STORED_LOW, STORED_HIGH = 400, 3400
MAX_STORED = 4095
#: Collimation bands of the `collimated` variant, as shares of the width and height
BAND_SIDES, BAND_TOP = 0.10, 0.06
#: The agreement the check states: |probability change| at most this ...
TOLERANCE = 0.05
#: ... for at least this share of the images, in every variant
TOLERANCE_SHARE = 0.95


def stored_pixels(display: np.ndarray, variant: str, seed: int = 0) -> np.ndarray:
    """12-bit stored values (uint16) that display as `display` (float [0, 1]) under the
    variant's header; `collimated` is larger by its bands."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown DICOM variant {variant!r}; choose one of "
                         f"{', '.join(VARIANTS)}")
    rng = np.random.default_rng(seed)
    step = (STORED_HIGH - STORED_LOW) / 255.0
    levels = np.round(display * 255.0)
    values = STORED_LOW + levels * step + rng.uniform(-0.5, 0.5, display.shape) * step
    values = np.clip(values, STORED_LOW, STORED_HIGH)
    if variant == "collimated":
        rows, cols = display.shape
        side, top = round(cols * BAND_SIDES), round(rows * BAND_TOP)
        framed = np.full((rows + top, cols + 2 * side), float(STORED_HIGH))
        framed[top:, side:side + cols] = values
        values = framed + rng.normal(0.0, 2.0, framed.shape)  # detector noise
    if variant == "monochrome1":
        values = MAX_STORED - values
    return np.clip(np.round(values), 0, MAX_STORED).astype(np.uint16)


def as_dataset(display: np.ndarray, variant: str, seed: int = 0) -> Dataset:
    """A DX For Presentation object holding the image as the variant stores it."""
    pixels = stored_pixels(display, variant, seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if variant == "monochrome1" else "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationIntentType = "FOR PRESENTATION"
    if variant != "full_range":
        # a linear window (PS3.3 C.11.2.1.2) over the stored range of the grey levels
        low, high = ((MAX_STORED - STORED_HIGH, MAX_STORED - STORED_LOW)
                     if variant == "monochrome1" else (STORED_LOW, STORED_HIGH))
        ds.WindowCenter = (low + high) / 2 + 0.5
        ds.WindowWidth = high - low + 1
    ds.PixelData = pixels.tobytes()
    return ds


@dataclass(frozen=True)
class Agreement:
    """How one variant's probabilities differ from the JPEG's, image by image."""

    variant: str
    changes: np.ndarray  # probability(DICOM variant) - probability(JPEG)
    decisions_changed: int  # images whose decision level differs

    def summary(self) -> dict[str, Any]:
        size = np.abs(self.changes)
        return {"variant": self.variant, "images": len(size),
                "mean_abs_change": float(size.mean()) if len(size) else None,
                "p95_abs_change": float(np.percentile(size, 95)) if len(size) else None,
                "max_abs_change": float(size.max()) if len(size) else None,
                "within_tolerance": float(np.mean(size <= TOLERANCE)) if len(size) else None,
                "decisions_changed": self.decisions_changed}


def check_dicom(pipeline: Pipeline, samples: Sequence[Sample], *,
                variants: Sequence[str] = VARIANTS, batch: int = 16) -> dict[str, Any]:
    """Every readable image of `samples` through `pipeline` as its JPEG and as each
    DICOM variant (written to a private temporary folder and read back); the summary
    per variant, and whether each met the stated tolerance."""
    jpeg: list[float] = []
    levels: list[object] = []
    found: dict[str, list[tuple[float, object]]] = {variant: [] for variant in variants}
    unreadable = 0
    with tempfile.TemporaryDirectory(prefix="fractured-dicom-check-") as scratch:
        for start in range(0, len(samples), batch):
            images = []
            for sample in samples[start:start + batch]:
                try:
                    images.append(load_image(sample.path).pixels)
                except DecodeError as exc:
                    unreadable += 1
                    log.warning("dicom_check.image_unreadable", path=str(sample.path),
                                reason=str(exc))
            for finding in _findings(pipeline, images):
                jpeg.append(finding.probability)
                levels.append(finding.level)
            for variant in variants:
                read_back = []
                for index, image in enumerate(images):
                    path = Path(scratch) / f"{variant}-{index}.dcm"
                    as_dataset(image, variant, seed=start + index).save_as(
                        path, enforce_file_format=True)
                    read_back.append(load_image(path).pixels)
                found[variant] += [(finding.probability, finding.level)
                                   for finding in _findings(pipeline, read_back)]
            log.info("dicom_check.progress", done=min(start + batch, len(samples)),
                     total=len(samples))
    base = np.array(jpeg)
    results = []
    for variant in variants:
        probabilities = np.array([probability for probability, _ in found[variant]])
        changed = sum(level != before for (_, level), before
                      in zip(found[variant], levels, strict=True))
        results.append(Agreement(variant, probabilities - base, changed).summary())
    return {"images": len(base), "unreadable": unreadable, "tolerance": TOLERANCE,
            "tolerance_share": TOLERANCE_SHARE, "variants": results,
            "passed": all(row["within_tolerance"] is not None
                          and row["within_tolerance"] >= TOLERANCE_SHARE for row in results)}


def _findings(pipeline: Pipeline, images: Sequence[np.ndarray]) -> list[Any]:
    ref = ImageRef("", "", "", "")
    return pipeline.run([(ref, image) for image in images]) if images else []


def report_markdown(result: dict[str, Any], *, bundle: str, part: str) -> str:
    """The check as a section of a model card or of notes."""
    lines = [f"## DICOM check ({bundle}, {part} part)", "",
             f"Each of {result['images']} images written again as 12-bit DICOM and read "
             "back through the node's reader; the bundle's probability compared with the "
             f"one it gives the JPEG export. Stated tolerance: |change| <= "
             f"{result['tolerance']} for at least {result['tolerance_share']:.0%} of the "
             f"images in every variant: **{'met' if result['passed'] else 'NOT met'}**.",
             "", "| Variant | Mean abs change | 95th pct | Max | Within tolerance | "
             "Decisions changed |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {row['variant']} | {row['mean_abs_change']:.4f} | "
              f"{row['p95_abs_change']:.4f} | {row['max_abs_change']:.4f} | "
              f"{row['within_tolerance']:.1%} | {row['decisions_changed']} |"
              for row in result["variants"] if row["images"]]
    return "\n".join(lines) + "\n"
