"""Where the heatmap points: the pointing game, and whether its peak lies in the field.

A class activation map that is hot on a collimator edge or a letterbox border while the
score says "fracture" tells the radiologist the wrong place and hints that the score
itself came from a shortcut. Two checks measure it from the peak of the heatmap the
node shows (`Finding.heatmap`, on the source image's pixel grid; `heatmap_peak`):

- the pointing game (Zhang et al., "Top-down neural attention by excitation backprop",
  ECCV 2016): on each image with true fracture boxes, a hit when the heatmap's maximum
  lies in a box, or within `tolerance` pixels of one (their 15 px; our CAM is a 1/32
  grid, so a peak is only as precise as one cell);
- the peak inside the exposed field (engine.exposed_field): never on the collimation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fractured.training.evaluation.classification import proportion

#: Pixels around a box within which a peak still counts as a hit (the paper's 15 px).
POINTING_TOLERANCE = 15.0


def points_into(point: tuple[float, float], boxes: ArrayLike, tolerance: float = 0.0) -> bool:
    """Whether (x, y) lies inside any box (x0, y0, x1, y1), grown by `tolerance`."""
    x, y = point
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=float).reshape(-1, 4):
        if (x0 - tolerance <= x <= x1 + tolerance) and (y0 - tolerance <= y <= y1 + tolerance):
            return True
    return False


def pointing_game(peaks: Sequence[tuple[float, float] | None], boxes: Sequence[ArrayLike],
                  *, tolerance: float = POINTING_TOLERANCE) -> dict[str, Any]:
    """The share of images with boxes whose heatmap peak (x, y) hits one, strictly and
    within `tolerance` pixels, each with its exact (Clopper-Pearson) 95 % interval.
    Images without a true box are left out (there is nothing to point at); an image
    whose heatmap has no peak (None: nowhere hot) counts as a miss."""
    if len(peaks) != len(boxes):
        raise ValueError(f"{len(peaks)} peaks for {len(boxes)} box sets")
    scored = [(point, np.asarray(truth, dtype=float).reshape(-1, 4))
              for point, truth in zip(peaks, boxes, strict=True)
              if np.asarray(truth).size]
    strict = sum(point is not None and points_into(point, truth) for point, truth in scored)
    near = sum(point is not None and points_into(point, truth, tolerance)
               for point, truth in scored)
    return {"images": len(scored), "tolerance_px": tolerance,
            "strict": proportion(strict, len(scored)),
            "within_tolerance": proportion(near, len(scored))}
