"""A bundle's held-out numbers as the radiologist meets them, per body region.

An AUC says how well a score ranks; a radiologist never sees a ranking. The node shows
a decision at the operating points of the image's body region, boxes only on images
whose decision passes the box gate ([engine].boxes), and a heatmap. A hospital's AI
governance committee asks what those do: in each region, how many fractures the flag
finds and how many normal images it flags, with exact (Clopper-Pearson) intervals,
since a region may have a few dozen fractures or fewer; how many true boxes a drawn box
touches and how many boxes land on normal images; whether the heatmap's peak lies in
a true box (the pointing game) and inside the exposed field at all.

Everything here is computed from the node's own pass (`Pipeline.examine`, through
`bundle_scoring.measure`) and a probability per image, so a refitted probability (fuse)
is assessed with the points fitted for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from fractured.engine.bundle import Manifest
from fractured.engine.findings import LEVEL_ORDER, Box, DecisionLevel
from fractured.engine.pipeline import BOX_GATES
from fractured.engine.regions import POOLED, REGION_GROUPS, PointsRegion, region_group, region_of
from fractured.training.bundle_scoring import Measured
from fractured.training.evaluation.calibration import PointsRule
from fractured.training.evaluation.classification import auc_interval, proportion
from fractured.training.evaluation.localisation import pointing_game, points_into

#: The region table's last row: every image.
ALL = "all"
#: Overlap a drawn box needs with a true one to count as finding it: any (the box
#: points the reader at the fracture), and IoU >= 0.5 (it also outlines it).
STRICT_IOU = 0.5
#: The node's default box gate ([engine].boxes).
DEFAULT_GATE = "likely"

def assess(measured: Measured, probability: np.ndarray, points_for: PointsRule, *,
           gate: str = DEFAULT_GATE, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The node's decisions, boxes and heatmap peaks on `measured`'s images scored
    against their labels and true boxes (see the module docstring)."""
    if len(probability) != len(measured.samples):
        raise ValueError(f"{len(probability)} probabilities for {len(measured.samples)} "
                         "images")
    regions = [region_of(sample.body_part) for sample in measured.samples]
    decided = [points_for(region) for region in regions]
    levels = [points.level(float(p)) for (points, _), p in zip(decided, probability,
                                                             strict=True)]
    groups = np.array([region_group(region) for region in regions])
    rows = {name: groups == name for name in REGION_GROUPS}
    rows[ALL] = np.ones(len(regions), dtype=bool)
    table = {name: _region_row(measured.labels[mask], probability[mask],
                               [levels[i] for i in np.flatnonzero(mask)],
                               {decided[i][1] for i in np.flatnonzero(mask)},
                               bootstrap=bootstrap, seed=seed)
             for name, mask in rows.items() if mask.any()}
    truth = [_true_boxes(sample, shape) for sample, shape in zip(
        measured.samples, measured.shapes, strict=True)]
    shown = [boxes if level in BOX_GATES[gate] else ()
             for boxes, level in zip(measured.boxes, levels, strict=True)]
    fractured = [i for i, sample in enumerate(measured.samples) if sample.label == 1]
    return {
        "images": len(measured.samples),
        "regions": table,
        "boxes": _boxes(shown, truth, measured.labels, gate) if measured.detections else None,
        "pointing_game": pointing_game([measured.peaks[i] for i in fractured],
                                       [truth[i] for i in fractured]),
        "peak_in_field": _peaks_in_field(measured),
        "studies": simulated_studies(measured.labels, levels, list(groups), seed=seed),
        "region_check": _region_check(measured, groups),
    }


def _region_check(measured: Measured, groups: np.ndarray) -> dict[str, Any] | None:
    """The region check on images without a header (as these are: the body part hidden
    from the node): the share it accepts as like the training images, and the share
    whose nearest class is the labelled region, in all and per region group. None where
    the bundle has none."""
    seen = measured.seen
    if not seen or any(one is None for one in seen):
        return None
    familiar = np.array([one.familiar for one in seen])
    right = np.array([one.group == group for one, group in zip(seen, groups, strict=True)])
    present = [name for name in REGION_GROUPS if (groups == name).any()]
    return {"accepted": proportion(int(familiar.sum()), len(seen)),
            "region_correct": proportion(int(right.sum()), len(seen)),
            "per_region": {name: proportion(int(right[groups == name].sum()),
                                            int((groups == name).sum())) for name in present},
            "accepted_per_region": {name: proportion(int(familiar[groups == name].sum()),
                                                     int((groups == name).sum()))
                                    for name in present}}


@dataclass(frozen=True)
class NodeView:
    """What `assess` needs beside the test part: the validation part
    and its probability (for the pooled rows) and the operating points per region.
    `check_fitted_on_val`: the bundle's region check was fitted on the validation part
    too (check_fitted_on_val), so the pooled rows leave it out: on those images it would
    score its own fit."""

    val: Measured
    val_probability: np.ndarray
    points_for: PointsRule
    check_fitted_on_val: bool = False

    def assessed(self, test: Measured, probability: np.ndarray,
                 bootstrap: int) -> dict[str, Any]:
        both = assess(pooled(self.val, test), np.concatenate([self.val_probability,
                                                              probability]),
                      self.points_for, bootstrap=bootstrap)
        if self.check_fitted_on_val:
            both["region_check"] = None
        return {"gate": DEFAULT_GATE,
                "test": assess(test, probability, self.points_for, bootstrap=bootstrap),
                "validation_and_test": both}


def check_fitted_on_val(manifest: Manifest) -> bool:
    """Whether a bundle's region check was fitted on its classifier's validation part:
    one whose threshold was chosen by cross-validation over train and val
    (training.region_check) was; one thresholded on validation alone was not."""
    use = manifest.intended_use
    return bool(use is not None and use.region_check is not None
                and "accepted_by_fold" in use.region_check.validation)


def simulated_studies(labels: np.ndarray, levels: Sequence[DecisionLevel],
                      groups: Sequence[str], *, seed: int = 0) -> dict[str, Any]:
    """The study-level verdict (`findings.study_level`: the highest level of a study's
    images) scored on studies made from single images, since the data has no patients:
    within each region, the images in a seeded random order are dealt into studies of
    2, 3, 4, 2, 3, 4... images (a last one of a single image joins the one before). A
    study is fractured when any of its images is."""
    rng = np.random.default_rng(seed)
    studies: list[list[int]] = []
    for name in sorted(set(groups)):
        members = [i for i, group in enumerate(groups) if group == name]
        order = [members[i] for i in rng.permutation(len(members))]
        start, size = 0, 2
        while start < len(order):
            studies.append(order[start:start + size])
            start, size = start + size, 2 + (size - 1) % 3
        if len(studies[-1]) == 1 and len(order) > 1:
            lone = studies.pop()
            studies[-1] += lone
    fractured = np.array([labels[study].any() for study in studies])
    top = [max((levels[i] for i in study), key=LEVEL_ORDER.index) for study in studies]
    row: dict[str, Any] = {
        "how": "images of one region dealt into studies of 2-4 (seeded); a study is "
               "fractured when any image is; its level is the highest of its images'",
        "studies": len(studies), "fractured": int(fractured.sum())}
    for name, passed in (("high_sensitivity", (DecisionLevel.POSSIBLE, DecisionLevel.LIKELY)),
                         ("high_specificity", (DecisionLevel.LIKELY,))):
        called = np.array([level in passed for level in top])
        row[name] = {"sensitivity": proportion((called & fractured).sum(), fractured.sum()),
                     "specificity": proportion((~called & ~fractured).sum(),
                                               (~fractured).sum())}
    return row


def pooled(first: Measured, second: Measured) -> Measured:
    """Two parts' measurements as one (validation and test pooled)."""
    return Measured(
        first.samples + second.samples, np.concatenate([first.evidence, second.evidence]),
        np.concatenate([first.labels, second.labels]), first.unreadable + second.unreadable,
        first.detections + second.detections, first.boxes + second.boxes,
        first.peaks + second.peaks, first.fields + second.fields,
        first.shapes + second.shapes, first.seen + second.seen)


def _region_row(labels: np.ndarray, probability: np.ndarray, levels: Sequence[DecisionLevel],
                sources: set[PointsRegion | None], *, bootstrap: int,
                seed: int) -> dict[str, Any]:
    fracture = labels == 1
    possible = np.array([level is not DecisionLevel.NEGATIVE for level in levels])
    likely = np.array([level is DecisionLevel.LIKELY for level in levels])
    row: dict[str, Any] = {
        "images": len(labels), "fractures": int(fracture.sum()),
        "normals": int((~fracture).sum()),
        "points": ("own" if sources and all(s not in (None, POOLED) for s in sources)
                   else "pooled" if sources <= {None, POOLED} else "mixed"),
        "roc_auc": None, "roc_auc_ci95": None}
    if fracture.any() and (~fracture).any():
        row["roc_auc"] = float(roc_auc_score(labels, probability))
        if bootstrap:
            row["roc_auc_ci95"] = auc_interval(labels, probability, bootstrap, seed)
    for name, called in (("high_sensitivity", possible), ("high_specificity", likely)):
        row[name] = {"sensitivity": proportion((called & fracture).sum(), fracture.sum()),
                     "specificity": proportion((~called & ~fracture).sum(),
                                               (~fracture).sum()),
                     "flagged": proportion(called.sum(), len(labels))}
    return row


def _true_boxes(sample: Any, shape: tuple[int, int]) -> np.ndarray:
    """A sample's true boxes in its source pixels, (k, 4); none where it has none."""
    rows, cols = shape
    return np.array([[b.x0 * cols, b.y0 * rows, b.x1 * cols, b.y1 * rows]
                     for b in (sample.boxes or ())], dtype=float).reshape(-1, 4)


def _iou(box: Box, truth: np.ndarray) -> np.ndarray:
    """IoU of one drawn box with each true box (k,)."""
    x0 = np.maximum(box.x0, truth[:, 0])
    y0 = np.maximum(box.y0, truth[:, 1])
    x1 = np.minimum(box.x1, truth[:, 2])
    y1 = np.minimum(box.y1, truth[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = ((box.x1 - box.x0) * (box.y1 - box.y0)
             + (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1]) - inter)
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _boxes(shown: Sequence[tuple[Box, ...]], truth: Sequence[np.ndarray],
           labels: np.ndarray, gate: str) -> dict[str, Any]:
    """True boxes touched (and outlined) by a drawn box, fractured images with one,
    and drawn boxes that touch no true box, per normal image and on fractured ones."""
    true_boxes = touched = outlined = 0
    images = found_images = 0
    stray_on_normals = stray_on_fractured = 0
    for boxes, real, label in zip(shown, truth, labels, strict=True):
        overlaps = (np.stack([_iou(box, real) for box in boxes]) if boxes and len(real)
                    else np.zeros((len(boxes), len(real))))
        stray = int((overlaps <= 0).all(axis=1).sum()) if len(real) else len(boxes)
        if label == 0:
            stray_on_normals += stray
            continue
        stray_on_fractured += stray
        if not len(real):
            continue  # a fracture without a drawn truth box: nothing to find
        images += 1
        true_boxes += len(real)
        hit = (overlaps > 0).any(axis=0)
        touched += int(hit.sum())
        outlined += int((overlaps >= STRICT_IOU).any(axis=0).sum())
        found_images += int(hit.any())
    normals = int((labels == 0).sum())
    return {
        "gate": gate,
        "fracture_boxes_touched": proportion(touched, true_boxes),
        "fracture_boxes_outlined": proportion(outlined, true_boxes),
        "fractured_images_found": proportion(found_images, images),
        "normal_images": normals,
        "boxes_on_normal_images": stray_on_normals,
        "boxes_per_normal_image": stray_on_normals / normals if normals else None,
        "stray_boxes_on_fractured_images": stray_on_fractured,
    }


def _peaks_in_field(measured: Measured) -> dict[str, Any]:
    """How many heatmap peaks lie inside the image's exposed field, of the images whose
    heatmap has a peak at all."""
    pairs = [(point, field) for point, field in zip(measured.peaks, measured.fields,
                                                    strict=True) if point is not None]
    inside = sum(points_into(point, [[field.left, field.top, field.right - 1,
                                      field.bottom - 1]]) for point, field in pairs)
    return proportion(inside, len(pairs))
