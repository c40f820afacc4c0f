"""Image-level metrics of a fracture classifier: what a reader study or a CE file reports.

The curve-based numbers come from scikit-learn, a tested implementation, rather than
code of our own. What is ours: the decisions a clinical reader cares about (the
confusion matrix at the operating threshold, sensitivity at a fixed specificity and
the reverse), a stratified bootstrap interval for the AUC (a validation set of a few
hundred images gives an AUC whose uncertainty matters), and honest handling of data
that cannot support a number: a subset with no fractures gets None and a note saying
why, never a crash or a misleading 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import beta
from sklearn.metrics import (
    average_precision_score,
    cohen_kappa_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

#: The fixed points radiology AI papers quote: sensitivity at these specificities ...
FIXED_SPECIFICITIES = (0.90, 0.95)
#: ... and specificity at these sensitivities.
FIXED_SENSITIVITIES = (0.90, 0.95)
#: Curves are thinned to this many points for metrics.json (a plot needs no more).
CURVE_POINTS = 200
# Ratios such as 90/100 are compared with a target of 0.9 in floating point.
_TOLERANCE = 1e-12
#: Below this many images of the rarer class, an AUC is reported with a warning note.
FEW_FOR_AUC = 5


def validate_binary(y_true: ArrayLike, scores: ArrayLike, *,
                    probabilities: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Labels as an int array of 0/1 and scores as float64, or ValueError naming the problem.

    With `probabilities` the scores must lie in [0, 1]: logits passed by mistake would
    otherwise give a plausible AUC (it is rank-based) and nonsense everywhere else.
    """
    labels = np.asarray(y_true)
    values = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or values.ndim != 1:
        raise ValueError(f"y_true and scores must be 1-D, got shapes {labels.shape} and "
                         f"{values.shape}")
    if len(labels) != len(values):
        raise ValueError(f"y_true has {len(labels)} labels but there are {len(values)} "
                         "scores: they must pair up one per image")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError(f"y_true must hold only 0 and 1, got {sorted(set(labels.tolist()))[:5]}")
    if not np.isfinite(values).all():
        raise ValueError(f"{int((~np.isfinite(values)).sum())} scores are NaN or infinite")
    if probabilities and values.size and (values.min() < 0.0 or values.max() > 1.0):
        outside = int(((values < 0.0) | (values > 1.0)).sum())
        raise ValueError(f"{outside} probabilities lie outside [0, 1] (min {values.min():.4g}, "
                         f"max {values.max():.4g}): pass probabilities, not logits")
    return labels.astype(np.int64), values


def classification_metrics(y_true: ArrayLike, prob: ArrayLike, *, threshold: float,
                           bootstrap: int = 1000, seed: int = 0,
                           curves: bool = True) -> dict[str, Any]:
    """Everything metrics.json says about a classifier on one set of images.

    `prob >= threshold` counts as a fracture call. Keys: n, positives, negatives,
    threshold; at the threshold: accuracy, precision, recall, sensitivity (= recall),
    specificity, f1, kappa, confusion {tp, fp, tn, fn}; threshold-free: roc_auc,
    roc_auc_ci95 ([low, high], percentile interval of `bootstrap` stratified resamples;
    None when bootstrap is 0), bootstrap, average_precision; sensitivity_at_specificity
    and specificity_at_sensitivity (lists of {target, threshold, sensitivity,
    specificity}, the threshold being the one that achieves them); with `curves`,
    roc_curve {fpr, tpr, thresholds} and pr_curve {precision, recall, thresholds}
    (at most CURVE_POINTS points; a threshold beyond every score is None). A number the
    data cannot support is None, and `note` (otherwise None) says why.
    """
    labels, scores = validate_binary(y_true, prob)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be a count of resamples (0 for none), got {bootstrap}")
    positives = int(labels.sum())
    negatives = len(labels) - positives
    notes = []
    if not len(labels):
        notes.append("no images: nothing can be measured")
    elif not positives or not negatives:
        present, undefined = ("fractures", "specificity") if positives else (
            "non-fractures", "sensitivity")
        notes.append(f"only {present} ({len(labels)} images): {undefined} is undefined, and "
                     "ROC AUC, average precision and the fixed sensitivity/specificity points "
                     "need both classes")

    called = scores >= threshold
    tp = int((called & (labels == 1)).sum())
    fp = int((called & (labels == 0)).sum())
    fn = positives - tp
    tn = negatives - fp
    sensitivity = _ratio(tp, positives)
    precision = _ratio(tp, tp + fp)
    result: dict[str, Any] = {
        "n": len(labels),
        "positives": positives,
        "negatives": negatives,
        "threshold": float(threshold),
        "accuracy": _ratio(tp + tn, len(labels)),
        "precision": precision,
        "recall": sensitivity,
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, negatives),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "kappa": _kappa(labels, called),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
        "roc_auc": None,
        "roc_auc_ci95": None,
        "bootstrap": bootstrap,
        "average_precision": None,
        "sensitivity_at_specificity": None,
        "specificity_at_sensitivity": None,
    }
    if len(labels) and precision is None:
        notes.append(f"no image scored >= {threshold:g}: precision is undefined")
    if 0 < min(positives, negatives) < FEW_FOR_AUC:
        notes.append(f"only {min(positives, negatives)} "
                     f"{'fracture' if positives < negatives else 'normal'} image(s): the AUC "
                     "and its interval rest on too few to mean much")
    if positives and negatives:
        result.update(_ranking_metrics(labels, scores, bootstrap=bootstrap, seed=seed,
                                       curves=curves))
    elif curves:
        result.update(roc_curve=None, pr_curve=None)
    result["note"] = "; ".join(notes) or None
    return result


def subset_metrics(y_true: ArrayLike, prob: ArrayLike, subsets: Mapping[str, ArrayLike], *,
                   threshold: float, bootstrap: int = 1000,
                   seed: int = 0) -> dict[str, dict[str, Any]]:
    """`classification_metrics` per named subset (a body part, "hardware == 0"), no curves.

    A model can be good on average and poor on the wrists; subsets show it. Each mask is
    a boolean array over all images; an empty or one-class subset gets a note, not an
    error, since small subsets of a validation set often are.
    """
    labels, scores = validate_binary(y_true, prob)
    results = {}
    for name, mask in subsets.items():
        selected = np.asarray(mask)
        if selected.dtype != np.bool_ or selected.shape != labels.shape:
            raise ValueError(f"subset {name!r} must be a boolean mask of shape {labels.shape}, "
                             f"got {selected.dtype} {selected.shape}")
        results[name] = classification_metrics(labels[selected], scores[selected],
                                               threshold=threshold, bootstrap=bootstrap,
                                               seed=seed, curves=False)
    return results


def paired_auc_difference(y_true: ArrayLike, before: ArrayLike, after: ArrayLike, *,
                          bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """AUC(after) - AUC(before) on the same images, with its 95 % interval.

    Two scores of one image set are correlated, so their AUCs' separate intervals
    overlap even when one is reliably better; resampling the images once for both
    (stratified, as for `roc_auc_ci95`) measures the difference itself. Keys: n,
    positives, before, after, difference, difference_ci95 (None when bootstrap is 0),
    bootstrap, note (why the numbers are None, when they are).
    """
    labels, first = validate_binary(y_true, before, probabilities=False)
    _, second = validate_binary(labels, after, probabilities=False)
    if len(first) != len(second):
        raise ValueError(f"before has {len(first)} scores, after {len(second)}")
    positives = int(labels.sum())
    result: dict[str, Any] = {"n": len(labels), "positives": positives, "before": None,
                              "after": None, "difference": None, "difference_ci95": None,
                              "bootstrap": bootstrap, "note": None}
    if not positives or positives == len(labels):
        result["note"] = "both fractures and normals are needed for an AUC"
        return result
    result["before"] = float(roc_auc_score(labels, first))
    result["after"] = float(roc_auc_score(labels, second))
    result["difference"] = result["after"] - result["before"]
    if bootstrap:
        rng = np.random.default_rng(seed)
        positive, negative = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        differences = np.empty(bootstrap)
        for index in range(bootstrap):
            pick = np.concatenate([rng.choice(positive, len(positive)),
                                   rng.choice(negative, len(negative))])
            differences[index] = (roc_auc_score(labels[pick], second[pick])
                                  - roc_auc_score(labels[pick], first[pick]))
        low, high = np.percentile(differences, [2.5, 97.5])
        result["difference_ci95"] = [float(low), float(high)]
    return result


def _ranking_metrics(labels: np.ndarray, scores: np.ndarray, *, bootstrap: int, seed: int,
                     curves: bool) -> dict[str, Any]:
    """The threshold-free numbers; both classes are present."""
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    result: dict[str, Any] = {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "roc_auc_ci95": auc_interval(labels, scores, bootstrap, seed) if bootstrap else None,
        "average_precision": float(average_precision_score(labels, scores)),
        "sensitivity_at_specificity": [
            _sensitivity_at_specificity(fpr, tpr, thresholds, target)
            for target in FIXED_SPECIFICITIES],
        "specificity_at_sensitivity": [
            _specificity_at_sensitivity(fpr, tpr, thresholds, target)
            for target in FIXED_SENSITIVITIES],
    }
    if curves:
        fpr, tpr, thresholds = roc_curve(labels, scores)
        keep = _thin(len(fpr))
        result["roc_curve"] = {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist(),
                               "thresholds": _floats(thresholds[keep])}
        precision, recall, thresholds = precision_recall_curve(labels, scores,
                                                               drop_intermediate=True)
        # The last (precision 1, recall 0) point has no threshold: pad so columns align.
        thresholds = np.append(thresholds, np.inf)
        keep = _thin(len(precision))
        result["pr_curve"] = {"precision": precision[keep].tolist(),
                              "recall": recall[keep].tolist(),
                              "thresholds": _floats(thresholds[keep])}
    return result


def auc_interval(labels: np.ndarray, scores: np.ndarray, bootstrap: int,
                 seed: int) -> list[float]:
    """95 % percentile interval of the AUC over stratified bootstrap resamples.

    Positives and negatives are resampled separately, so every resample keeps the
    set's prevalence and both classes: plain resampling of a set with few fractures
    sometimes draws none, and the AUC of that resample does not exist.
    """
    rng = np.random.default_rng(seed)
    positive = scores[labels == 1]
    negative = scores[labels == 0]
    resampled_labels = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    aucs = np.empty(bootstrap)
    for index in range(bootstrap):
        resampled = np.concatenate([rng.choice(positive, len(positive)),
                                    rng.choice(negative, len(negative))])
        aucs[index] = roc_auc_score(resampled_labels, resampled)
    low, high = np.percentile(aucs, [2.5, 97.5])
    return [float(low), float(high)]


def _sensitivity_at_specificity(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
                                target: float) -> dict[str, Any]:
    """The most sensitive threshold whose specificity is at least `target`.

    Of thresholds with equal sensitivity the highest is taken: it has the better
    specificity. The ROC starts at (0, 0), so some threshold always qualifies.
    """
    feasible = np.flatnonzero(1.0 - fpr >= target - _TOLERANCE)
    best = tpr[feasible].max()
    index = feasible[tpr[feasible] == best][0]
    return _point(target, fpr, tpr, thresholds, index)


def _specificity_at_sensitivity(fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
                                target: float) -> dict[str, Any]:
    """The most specific threshold whose sensitivity is at least `target`.

    Of thresholds with equal specificity the lowest is taken: it has the better
    sensitivity. The ROC ends at (1, 1), so some threshold always qualifies.
    """
    feasible = np.flatnonzero(tpr >= target - _TOLERANCE)
    best = fpr[feasible].min()
    index = feasible[fpr[feasible] == best][-1]
    return _point(target, fpr, tpr, thresholds, index)


def _point(target: float, fpr: np.ndarray, tpr: np.ndarray, thresholds: np.ndarray,
           index: int) -> dict[str, Any]:
    return {"target": target, "threshold": _floats(thresholds[index:index + 1])[0],
            "sensitivity": float(tpr[index]), "specificity": float(1.0 - fpr[index])}


def _kappa(labels: np.ndarray, called: np.ndarray) -> float | None:
    """Cohen's kappa between truth and the calls; None when chance agreement is total
    (truth and calls all one and the same class), where kappa is 0/0."""
    calls = called.astype(np.int64)
    if len(np.union1d(labels, calls)) < 2:
        return None
    return float(cohen_kappa_score(labels, calls, labels=[0, 1]))


def clopper_pearson(successes: int, trials: int,
                    confidence: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of a proportion: never narrower than its
    nominal coverage, which a sensitivity on a few dozen fractures of one region needs
    (a normal-approximation interval would leave [0, 1] or shrink to nothing at 0 or n).
    """
    if not 0 <= successes <= trials or trials < 1:
        raise ValueError(f"{successes} successes of {trials} trials")
    tail = (1.0 - confidence) / 2.0
    low = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    high = (1.0 if successes == trials
            else float(beta.ppf(1.0 - tail, successes + 1, trials - successes)))
    return low, high


def proportion(k: int, n: int) -> dict[str, Any]:
    """k of n, its rate and its exact 95 % interval (rate and interval None when n is
    0): how every count the card reports is recorded."""
    return {"k": int(k), "n": int(n), "rate": k / n if n else None,
            "interval": list(clopper_pearson(int(k), int(n))) if n else None}


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _thin(length: int) -> np.ndarray:
    """Indices of at most CURVE_POINTS evenly spread points, both ends kept."""
    return np.unique(np.linspace(0, length - 1, min(length, CURVE_POINTS)).round().astype(int))


def _floats(values: np.ndarray) -> list[float | None]:
    """JSON has no infinity: roc_curve's "above every score" threshold becomes None."""
    return [float(value) if np.isfinite(value) else None for value in values]
