"""One summary Secondary Capture per study: every image's overlay on one page.

Optional (`[results].summary_image`): in a viewer that shows one image per series at a
time, a radiologist sees the whole study's result at a glance, with a study banner
(the study's level, the highest of its images', and how many likely and possible
fractures) above the per-image overlays
laid out in a grid. It references every source image, and sits in the overlay series
after the per-image overlays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from fractured.engine.findings import Finding, study_verdict
from fractured.results import codes
from fractured.results.header import study_header
from fractured.results.overlay import (
    header_lines,
    render_overlay,
    rgb_capture,
    source_reference,
    text_banner,
)

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


def render_summary(findings: Sequence[Finding], displays: Sequence[np.ndarray], *,
                   max_size: int = 1024, colormap: str = "jet") -> np.ndarray:
    """A study banner over the images' overlays in a grid (two columns from two images),
    at most `max_size` wide, RGB uint8."""
    columns = 1 if len(findings) == 1 else 2
    rows = math.ceil(len(findings) / columns)
    cell = max_size // columns
    tiles = [render_overlay(f, d, max_size=cell, colormap=colormap)
             for f, d in zip(findings, displays, strict=True)]
    cell_height = max(tile.shape[0] for tile in tiles)
    grid = np.zeros((rows * cell_height, columns * cell, 3), np.uint8)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * cell_height, (index % columns) * cell
        grid[top:top + tile.shape[0], left:left + tile.shape[1]] = tile
    banner = text_banner([*header_lines(findings[0].model),
                          (study_verdict(findings), _WHITE, _BLACK)], grid.shape[1])
    return np.vstack([banner, grid])


def make_summary(findings: Sequence[Finding], sources: Sequence[Dataset],
                 displays: Sequence[np.ndarray], *, series_instance_uid: str,
                 series_number: int, instance_number: int, max_size: int = 1024,
                 colormap: str = "jet") -> hd.sc.SCImage:
    """The study's summary Secondary Capture, in the sources' study and patient."""
    if len({f.model for f in findings}) != 1:
        raise ValueError("a summary shows the findings of one model")
    for finding, source in zip(findings, sources, strict=True):
        if finding.image.sop_instance_uid != str(source.SOPInstanceUID):
            raise ValueError(f"finding is about {finding.image.sop_instance_uid}, "
                             f"source is {source.SOPInstanceUID}")
    image = render_summary(findings, displays, max_size=max_size, colormap=colormap)
    model = findings[0].model
    header = study_header(sources[0])
    summary = rgb_capture(image, header, model, series_instance_uid=series_instance_uid,
                          series_number=series_number, instance_number=instance_number)
    summary.PatientOrientation = ""  # a page of several images has no one orientation
    # The side, when every image shows the same one (Type 2C: empty when unknown).
    sides = {str(ds.get("ImageLaterality") or ds.get("Laterality") or "") for ds in sources}
    summary.Laterality = sides.pop() if len(sides) == 1 else ""
    summary.SourceImageSequence = [source_reference(source) for source in sources]
    summary.DerivationDescription = (
        f"{codes.DISCLAIMER}. Study summary: the fracture overlays of {len(sources)} "
        f"images by {model.name} {model.version}, tiled under a study banner.")
    summary.ImageComments = "AI fracture summary of the study"
    summary.BurnedInAnnotation = "NO"
    return summary
