"""Calibration and the bundle's two operating points.

A network's sigmoid output is not a probability until it is calibrated: modern CNNs
are over-confident (Guo et al. 2017, "On Calibration of Modern Neural Networks").
Temperature scaling divides the logit by one scalar T fitted on validation data; it
leaves the ranking (and so the AUC) unchanged and makes "0.8" mean "fractured about
80 % of the time". The operating points are then chosen on the calibrated scores,
because those are the numbers the engine thresholds.

A model trained with class weights (or a balanced sampler) has logits shifted by about
log(weight): its raw probabilities are inflated for the minority class however well it
ranks, and no temperature can undo a shift. `fit_shift_and_temperature` fits both, as
Platt scaling does (p = sigmoid((logit + shift) / T)); the shift is folded into the
classifier head's bias, so the bundle keeps one temperature and the CAM's zero level
moves with the logit's.

One pair of thresholds fitted on every validation image can mean little in one body
region: where a region's normals score higher than the rest (hands, on FracAtlas), the
pooled high-sensitivity point flags most of them. `choose_region_operating_points` fits
a pair per region on that region's images, with a specificity floor under the
high-sensitivity point and a minimum of cases below which the pooled pair is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import expit

from fractured.engine.bundle import OWN_POINTS, Reached, RegionFit, RegionPoints
from fractured.engine.findings import OperatingPoints
from fractured.engine.regions import POOLED, PointsRegion, Region, region_group, region_of
from fractured.training.evaluation.classification import validate_binary

log = structlog.get_logger()

#: log T is searched in this range (T from about 0.007 to 150): any fitted T near its
#: ends means the logits carry no usable signal, not that the bound is too tight.
LOG_TEMPERATURE_BOUNDS = (-5.0, 5.0)


def fit_temperature(logits: ArrayLike, y_true: ArrayLike) -> float:
    """The T > 0 minimising the binary negative log-likelihood of sigmoid(logit / T).

    The search is over log T, which keeps T positive and is bounded so a degenerate
    set cannot run it off to 0 or infinity. The NLL is convex in 1/T (a one-parameter
    logistic regression), so the bounded scalar search finds the global minimum.
    """
    labels, values = validate_binary(y_true, logits, probabilities=False)
    _require_both_classes(labels, "fit a temperature")

    def nll(log_temperature: float) -> float:
        z = values / math.exp(log_temperature)
        # log(1 + e^z) - y z, computed without overflow for large |z|.
        return float(np.mean(np.logaddexp(0.0, z) - labels * z))

    result = minimize_scalar(nll, bounds=LOG_TEMPERATURE_BOUNDS, method="bounded",
                             options={"xatol": 1e-6})
    return math.exp(result.x)


def fit_shift_and_temperature(logits: ArrayLike, y_true: ArrayLike) -> tuple[float, float]:
    """(shift, T) minimising the binary NLL of sigmoid((logit + shift) / T): a
    one-feature logistic regression (weight 1/T, bias shift/T), convex, solved by
    Newton's method. Falls back to (0, fit_temperature) when the fitted weight is not
    positive (logits that rank backwards cannot be calibrated by a temperature)."""
    labels, values = validate_binary(y_true, logits, probabilities=False)
    _require_both_classes(labels, "fit a logit shift and temperature")
    weight, bias = 1.0, 0.0
    for _ in range(100):
        z = weight * values + bias
        p = expit(z)
        gradient = np.array([np.mean((p - labels) * values), np.mean(p - labels)])
        w = p * (1.0 - p)
        hessian = np.array([[np.mean(w * values * values), np.mean(w * values)],
                            [np.mean(w * values), np.mean(w)]]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weight, bias = weight - step[0], bias - step[1]
        if np.abs(step).max() < 1e-10:
            break
    low, high = (math.exp(-bound) for bound in (LOG_TEMPERATURE_BOUNDS[1],
                                                  LOG_TEMPERATURE_BOUNDS[0]))
    if not (math.isfinite(weight) and math.isfinite(bias)) or not low <= weight <= high:
        return 0.0, fit_temperature(values, labels)
    temperature = 1.0 / float(weight)
    return float(bias) * temperature, temperature


def expected_calibration_error(y_true: ArrayLike, prob: ArrayLike, bins: int = 15) -> float:
    """Mean |observed fracture rate - mean predicted probability| over equal-width bins,
    weighted by the images in each bin (Guo et al.'s ECE on the fracture probability).

    The fracture probability rather than the top-class confidence is binned, since it
    is the number the engine shows and thresholds.
    """
    counts, confidence, frequency = _binned(y_true, prob, bins)
    return float(np.abs(frequency - confidence).sum() / counts.sum())


def reliability_curve(y_true: ArrayLike, prob: ArrayLike, bins: int = 15) -> dict[str, Any]:
    """The reliability diagram's data: per equal-width probability bin, its `centres`,
    the mean predicted probability (`confidence`), the observed fracture rate
    (`frequency`) and `counts`; also the bin `edges`. Empty bins have None for
    confidence and frequency. Probability 1.0 falls in the last bin.
    """
    counts, confidence, frequency = _binned(y_true, prob, bins)
    edges = np.linspace(0.0, 1.0, bins + 1)
    return {
        "edges": edges.tolist(),
        "centres": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "confidence": [float(total / count) if count else None
                       for total, count in zip(confidence, counts, strict=True)],
        "frequency": [float(total / count) if count else None
                      for total, count in zip(frequency, counts, strict=True)],
        "counts": counts.tolist(),
    }


def _binned(y_true: ArrayLike, prob: ArrayLike,
            bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: image count, sum of probabilities, sum of labels."""
    labels, scores = validate_binary(y_true, prob)
    if not len(labels):
        raise ValueError("calibration needs at least one image")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    index = np.minimum((scores * bins).astype(np.int64), bins - 1)
    return (np.bincount(index, minlength=bins),
            np.bincount(index, weights=scores, minlength=bins),
            np.bincount(index, weights=labels.astype(np.float64), minlength=bins))


def choose_operating_points(y_true: ArrayLike, prob: ArrayLike, *, sensitivity: float = 0.95,
                            specificity: float = 0.90) -> tuple[OperatingPoints, dict[str, Any]]:
    """The bundle's two thresholds, chosen on (calibrated) validation probabilities.

    High sensitivity: the highest threshold still calling at least `sensitivity` of the
    fractures (a "possible fracture" above it). High specificity: the lowest threshold
    still clearing at least `specificity` of the normals (a "likely fracture" above it).
    `prob >= threshold` is a call, as in the engine. When the model beats both targets
    the two cross (the sensitivity threshold is the higher); every threshold between
    them meets both targets, so both are set to their midpoint and the description says
    so. Returns the points and a JSON-ready description: high_sensitivity and
    high_specificity ({threshold, target, sensitivity, specificity} achieved on this
    data), crossed, n, positives, note.
    """
    labels, scores = validate_binary(y_true, prob)
    _require_both_classes(labels, "choose operating points")
    for name, target in (("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 < target <= 1.0:
            raise ValueError(f"target {name} must lie in (0, 1], got {target}")
    positive = np.sort(scores[labels == 1])[::-1]
    negative = np.sort(scores[labels == 0])
    # The k-th highest fracture score: thresholds above it call fewer than k fractures.
    sensitive = float(positive[math.ceil(sensitivity * len(positive) - 1e-9) - 1])
    specific, cleared = _specific_threshold(scores, negative, specificity)
    if specific > 1.0:
        raise ValueError(f"specificity {specificity:g} is unreachable: a normal image scores "
                         f"{cleared:g} and thresholds stop at 1")
    crossed = sensitive > specific
    note = None
    if crossed:
        note = (f"the targets cross (sensitivity {sensitivity:g} holds up to {sensitive:.4g}, "
                f"specificity {specificity:g} from {specific:.4g}): both thresholds are set to "
                "the midpoint, which meets both")
        sensitive = specific = (sensitive + specific) / 2
    points = OperatingPoints(high_sensitivity=sensitive, high_specificity=specific)
    description = {
        "high_sensitivity": _achieved(labels, scores, sensitive, target=sensitivity),
        "high_specificity": _achieved(labels, scores, specific, target=specificity),
        "crossed": crossed,
        "n": len(labels),
        "positives": int(labels.sum()),
        "note": note,
    }
    return points, description


def _specific_threshold(scores: np.ndarray, negative: np.ndarray,
                        specificity: float) -> tuple[float, float]:
    """The lowest threshold clearing at least `specificity` of the normals (`negative`:
    their scores, ascending), and the normal score it clears.

    Just above the m-th lowest normal score: m normals fall below it. The lowest such
    threshold is the next score up, or the next float when no score is higher.
    """
    cleared = float(negative[math.ceil(specificity * len(negative) - 1e-9) - 1])
    above = scores[scores > cleared]
    return (float(above.min()) if len(above) else float(np.nextafter(cleared, np.inf)),
            cleared)


@dataclass(frozen=True)
class RegionRule:
    """When a region's validation images carry operating points of their own, and the
    specificity its high-sensitivity point keeps at least (train.toml's
    [classifier].region_min_fractures, region_min_normals, region_min_specificity)."""

    min_fractures: int
    min_normals: int
    min_specificity: float


def choose_region_operating_points(
        y_true: ArrayLike, prob: ArrayLike, regions: Sequence[Region | None],
        pooled: OperatingPoints, rule: RegionRule, *, sensitivity: float = 0.95,
        specificity: float = 0.90) -> dict[Region, RegionPoints]:
    """Each region's two thresholds, chosen on its own validation images as the pooled
    ones are on all of them (`choose_operating_points`, the same targets).

    `regions` gives each image's region (None: of none; such images count for the
    pooled points only). Where a region's high-sensitivity threshold would leave its
    specificity below `rule.min_specificity`, the threshold rises to the lowest that
    keeps it, and the sensitivity reached there is recorded (`floor_applied`): a
    "possible fracture" that flags most normals of a region tells its readers nothing.
    A region with fewer than `rule.min_fractures` fractures or `rule.min_normals`
    normals keeps `pooled` (source "pooled"), with what those reach on its images.
    Returns the regions that have images, in Region order; none where no image has one.
    """
    labels, scores = validate_binary(y_true, prob)
    if len(regions) != len(labels):
        raise ValueError(f"{len(regions)} regions for {len(labels)} images")
    if not 0.0 <= rule.min_specificity <= specificity:
        raise ValueError(f"the specificity floor must lie in [0, {specificity:g}] (the "
                         f"high-specificity target), got {rule.min_specificity}")
    chosen: dict[Region, RegionPoints] = {}
    for region in Region:
        mask = np.array([found is region for found in regions], dtype=bool)
        if mask.any():
            chosen[region] = _region_points(labels[mask], scores[mask], pooled, rule,
                                            sensitivity=sensitivity, specificity=specificity)
    return chosen


def _region_points(labels: np.ndarray, scores: np.ndarray, pooled: OperatingPoints,
                   rule: RegionRule, *, sensitivity: float,
                   specificity: float) -> RegionPoints:
    """One region's points (see choose_region_operating_points)."""
    fractures = int(labels.sum())
    normals = len(labels) - fractures
    if fractures < rule.min_fractures or normals < rule.min_normals:
        return _region_entry(labels, scores, pooled, POOLED, floor_applied=False)
    points, achieved = choose_operating_points(labels, scores, sensitivity=sensitivity,
                                               specificity=specificity)
    floor_applied = achieved["high_sensitivity"]["specificity"] < rule.min_specificity
    if floor_applied:  # never above high_specificity: its target is at least the floor
        floor, _ = _specific_threshold(scores, np.sort(scores[labels == 0]),
                                       rule.min_specificity)
        points = OperatingPoints(floor, points.high_specificity)
    return _region_entry(labels, scores, points, OWN_POINTS, floor_applied=floor_applied)


def _region_entry(labels: np.ndarray, scores: np.ndarray, points: OperatingPoints,
                  source: str, *, floor_applied: bool) -> RegionPoints:
    """The manifest's record of a region's points and what they reach on its images."""
    def reached(threshold: float) -> Reached:
        called = scores >= threshold
        fractured, normal = called[labels == 1], ~called[labels == 0]
        return Reached(sensitivity=float(fractured.mean()) if len(fractured) else None,
                       specificity=float(normal.mean()) if len(normal) else None)

    fractures = int(labels.sum())
    return RegionPoints(
        high_sensitivity=points.high_sensitivity, high_specificity=points.high_specificity,
        source=source,
        fitted_on=RegionFit(fractures=fractures, normals=len(labels) - fractures,
                            high_sensitivity=reached(points.high_sensitivity),
                            high_specificity=reached(points.high_specificity),
                            floor_applied=floor_applied))


def fit_region_points(labels: ArrayLike, prob: ArrayLike, body_parts: Sequence[str],
                      pooled: OperatingPoints, rule: RegionRule, *, sensitivity: float,
                      specificity: float) -> dict[str, dict[str, Any]]:
    """The manifest's `classifier.operating_points_by_region` (as best.pt's calibration
    keeps it too) for validation images with these `body_parts` (the data's labels,
    mapped by engine.regions), each region logged; {} where no image has a region, so
    nothing per region is written. Calibration and `fractured fuse` both fit so."""
    chosen = choose_region_operating_points(
        labels, prob, [region_of(part) for part in body_parts], pooled, rule,
        sensitivity=sensitivity, specificity=specificity)
    for region, entry in chosen.items():
        fit = entry.fitted_on
        log.info("calibration.region_points", region=region.value, source=entry.source,
                 high_sensitivity=round(entry.high_sensitivity, 4),
                 high_specificity=round(entry.high_specificity, 4),
                 fractures=fit.fractures, normals=fit.normals,
                 floor_applied=fit.floor_applied,
                 sensitivity=fit.high_sensitivity.sensitivity,
                 specificity=fit.high_sensitivity.specificity)
    return {region.value: entry.to_dict() for region, entry in chosen.items()}


#: `ClassifierSpec.points_for`'s signature: a region (None: no region) to the points
#: that decide its images and whose they are.
PointsRule = Callable[[Region | None], tuple[OperatingPoints, PointsRegion | None]]


def points_rule(pooled: Mapping[str, float],
                by_region: Mapping[str, Mapping[str, Any]] | None) -> PointsRule:
    """`ClassifierSpec.points_for` for points not yet in a manifest (calibration and
    `fractured fuse` fit them): the region's own pair where its entry is its own, else
    the pooled."""
    pooled_points = OperatingPoints(pooled["high_sensitivity"], pooled["high_specificity"])

    def rule(region: Region | None) -> tuple[OperatingPoints, PointsRegion | None]:
        if by_region is None:
            return pooled_points, None
        entry = by_region.get(region.value) if region is not None else None
        if entry is None or entry.get("source") != OWN_POINTS:
            return pooled_points, POOLED
        return OperatingPoints(entry["high_sensitivity"], entry["high_specificity"]), region

    return rule


def expected_flag_rates(prob: ArrayLike, body_parts: Sequence[str],
                        rule: PointsRule) -> dict[str, dict[str, Any]]:
    """The manifest's `classifier.expected_flag_rates`: per body region (and OTHER), the
    share of these validation images each point flags, each image decided at its
    region's points (`rule`, as `points_rule` makes it), as the node decides. Groups
    without an image are left out."""
    prob = np.asarray(prob, dtype=float)
    regions = [region_of(part) for part in body_parts]
    groups: dict[str, list[int]] = {}
    for index, region in enumerate(regions):
        groups.setdefault(region_group(region), []).append(index)
    rates = {}
    for name, indices in groups.items():
        points, _ = rule(regions[indices[0]])
        scores = prob[indices]
        rates[name] = {"images": len(indices),
                       "high_sensitivity": float((scores >= points.high_sensitivity).mean()),
                       "high_specificity": float((scores >= points.high_specificity).mean())}
    return rates


def _achieved(labels: np.ndarray, scores: np.ndarray, threshold: float, *,
              target: float) -> dict[str, float]:
    called = scores >= threshold
    return {"threshold": threshold, "target": target,
            "sensitivity": float(called[labels == 1].mean()),
            "specificity": float((~called[labels == 0]).mean())}


def _require_both_classes(labels: np.ndarray, purpose: str) -> None:
    positives = int(labels.sum())
    if not positives or positives == len(labels):
        raise ValueError(f"cannot {purpose} from {len(labels)} images with {positives} "
                         "fractures: both fractures and normals are needed")
