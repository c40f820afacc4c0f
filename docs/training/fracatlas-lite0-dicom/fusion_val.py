"""Should the candidate's probability be fused with the detector's box score? Decided on
validation only, before the test part is scored (2026-12-07; not in the product).

Runs the float candidate bundle on ONNX Runtime, as the node does, over the readable
validation images of its split (`Pipeline.evidence`: per image the calibrated logit and
the detector's best box score), then fits `fractured fuse`'s logistic regression by
10-fold cross-validation on those images and compares its out-of-fold AUC with the
classifier's alone, paired (bootstrap). Rule, stated before running: fuse if the
out-of-fold fused AUC is higher; otherwise the unfused bundle goes on to INT8.

    .venv/bin/python docs/training/fracatlas-lite0-dicom/fusion_val.py engines/fractured-0.9.0
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from fractured import log
from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import load_image
from fractured.training.bundle_scoring import open_split
from fractured.training.evaluation import paired_auc_difference

SPLIT = Path("docs/training/fracatlas-resnet18-e50")


def evidence(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels, and per validation image [calibrated logit, best box score]."""
    bundle = Bundle.load(bundle_dir)
    pipeline = Pipeline(bundle, backend="onnxruntime", boxes="always")
    labels, rows = [], []
    for sample in open_split(bundle, SPLIT, None, ()).parts["val"]:
        try:
            pixels = load_image(sample.path).pixels
        except DecodeError:
            continue
        labels.append(sample.label)
        rows.append(pipeline.evidence([pixels])[0])
    return np.array(labels), np.array(rows)


def main(bundle_dir: Path) -> None:
    log.configure("warning")  # the figures below, not every image's exposed field
    labels, rows = evidence(bundle_dir)
    folds = StratifiedKFold(10, shuffle=True, random_state=0)
    fused = cross_val_predict(LogisticRegression(C=1.0), rows, labels, cv=folds,
                              method="predict_proba")[:, 1]
    print(f"{len(labels)} validation images, {int(labels.sum())} with fracture")
    print(f"box score alone: AUC {roc_auc_score(labels, rows[:, 1]):.4f}")
    diff = paired_auc_difference(labels, rows[:, 0], fused, bootstrap=2000)
    low, high = diff["difference_ci95"]
    print(f"classifier alone {diff['before']:.4f}; fused, 10-fold out-of-fold "
          f"{diff['after']:.4f}; difference {diff['difference']:+.4f} "
          f"(paired 95 % CI {low:+.4f} to {high:+.4f})")
    print("fuse" if diff["difference"] > 0 else "do not fuse")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
