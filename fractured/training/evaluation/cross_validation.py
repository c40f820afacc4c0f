"""Cross-validation numbers: per-fold AUCs, their spread, and the pooled out-of-fold AUC.

K models of one recipe, each scored on the fold it did not train on, say two things. The
per-fold AUCs and their standard deviation show how much one validation part's AUC
wobbles, which is the noise a recipe comparison on a single split has to beat. Pooling
every fold's scores gives one AUC over all train+val images, each scored out of fold,
with a bootstrap interval about sqrt(K) times narrower than one fold's; per body part
the pool is large enough to say something about the rarer parts. The pooled AUC ranks
the scores of K different models together, so it usually lies a little below their
mean where their calibrations differ: both are reported.

Plain numpy arrays in, a JSON-ready dict out, as elsewhere in `evaluation`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

from fractured.training.evaluation.classification import auc_interval, validate_binary

#: The body part name of images without one.
UNKNOWN_PART = "unknown"


@dataclass(frozen=True)
class FoldScores:
    """One fold's out-of-fold scores: labels, calibrated probabilities and body parts of
    its validation images, and where they came from (`source`, e.g. the run directory).

    No threshold: each model's operating points were fitted on this very fold, so
    sensitivities at them would flatter it; the AUCs are threshold-free."""

    fold: int
    source: str
    labels: np.ndarray
    prob: np.ndarray
    body_parts: Sequence[str]


def cross_validation_metrics(folds: Sequence[FoldScores], *, k: int, bootstrap: int = 1000,
                             seed: int = 0) -> dict[str, Any]:
    """The cross-validation record of `folds` (some of the `k`; each fold at most once).

    Keys: k, folds_scored, missing_folds, coverage ("3 of 5 folds"); folds (per fold, in
    fold order: fold, source and its `auc_with_interval`, the AUC and interval
    `fractured evaluate` gives on the same scores); fold_auc_mean and fold_auc_sd
    (sample standard deviation; None with fewer than two AUCs); pooled
    (`auc_with_interval` of all folds' scores together); body_parts (the same per body
    part, by name).
    """
    if not folds:
        raise ValueError("no folds to report on")
    indices = [fold.fold for fold in folds]
    if len(set(indices)) != len(indices):
        raise ValueError(f"a fold is given twice: {sorted(indices)}")
    if not all(0 <= index < k for index in indices):
        raise ValueError(f"folds must lie in 0..{k - 1}, got {sorted(indices)}")
    ordered = sorted(folds, key=lambda fold: fold.fold)
    rows = [{"fold": fold.fold, "source": fold.source,
             **auc_with_interval(fold.labels, fold.prob, bootstrap=bootstrap, seed=seed)}
            for fold in ordered]
    aucs = [row["roc_auc"] for row in rows if row["roc_auc"] is not None]
    labels = np.concatenate([np.asarray(fold.labels) for fold in ordered])
    prob = np.concatenate([np.asarray(fold.prob, dtype=np.float64) for fold in ordered])
    parts = np.array([part or UNKNOWN_PART for fold in ordered for part in fold.body_parts])
    if len(parts) != len(labels):
        raise ValueError(f"{len(parts)} body parts for {len(labels)} images")
    return {
        "k": k,
        "folds_scored": len(rows),
        "missing_folds": sorted(set(range(k)) - set(indices)),
        "coverage": f"{len(rows)} of {k} folds",
        "folds": rows,
        "fold_auc_mean": float(np.mean(aucs)) if aucs else None,
        "fold_auc_sd": float(np.std(aucs, ddof=1)) if len(aucs) > 1 else None,
        "pooled": auc_with_interval(labels, prob, bootstrap=bootstrap, seed=seed),
        "body_parts": {part: auc_with_interval(labels[parts == part], prob[parts == part],
                                               bootstrap=bootstrap, seed=seed)
                       for part in sorted(set(parts.tolist()))},
    }


def auc_with_interval(y_true: ArrayLike, prob: ArrayLike, *, bootstrap: int = 1000,
                      seed: int = 0) -> dict[str, Any]:
    """n, positives, negatives, roc_auc and roc_auc_ci95 (the stratified bootstrap
    `classification_metrics` uses, same seed, so the same interval; None when bootstrap
    is 0), bootstrap, and a note when one class is missing (the AUC is then None).

    Only threshold-free numbers: pooled scores come from K models, each with its own
    thresholds, so no one threshold belongs to the pool.
    """
    labels, scores = validate_binary(y_true, prob)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    result: dict[str, Any] = {"n": len(labels), "positives": positives,
                              "negatives": negatives, "roc_auc": None, "roc_auc_ci95": None,
                              "bootstrap": bootstrap, "note": None}
    if not positives or not negatives:
        result["note"] = "both fractures and normals are needed for an AUC"
        return result
    result["roc_auc"] = float(roc_auc_score(labels, scores))
    if bootstrap:
        result["roc_auc_ci95"] = auc_interval(labels, scores, bootstrap, seed)
    return result
