"""Does a mirrored pass add to the fused decision? (2026-12-05; not in the product.)

Runs a bundle on ONNX Runtime, as the node does, over the readable validation images of
its split, each image as it is and mirrored left-right: per image the calibrated logit
and the detector's best box score of both passes (`Pipeline.evidence`). Then fits the
fusion's logistic regression on validation with the mirrored numbers averaged in (or the
larger box score taken) and prints each way's validation AUC, in-sample and by 10-fold
cross-validation. The test part is not looked at.

    .venv/bin/python docs/training/fracatlas-fusion-det512/mirror.py engines/fractured-0.8.1
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import load_image
from fractured.training.bundle_scoring import open_split

SPLIT = Path("docs/training/fracatlas-resnet18-e50")


def features(bundle_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Labels, and per image [logit, box score, mirrored logit, mirrored box score]."""
    bundle = Bundle.load(bundle_dir)
    pipeline = Pipeline(bundle, backend="onnxruntime", boxes="always")
    labels, rows = [], []
    for sample in open_split(bundle, SPLIT, None, ()).parts["val"]:
        try:
            pixels = load_image(sample.path).pixels
        except DecodeError:
            continue
        both = pipeline.evidence([pixels, np.ascontiguousarray(pixels[:, ::-1])])
        labels.append(sample.label)
        rows.append([*both[0], *both[1]])
    return np.array(labels), np.array(rows)


def main() -> None:
    y, x = features(Path(sys.argv[1]))
    logit, box, logit_mirrored, box_mirrored = x.T
    ways = {
        "logit, box score (as shipped)": np.c_[logit, box],
        "mean logit of both passes, box score": np.c_[(logit + logit_mirrored) / 2, box],
        "logit, mean box score of both passes": np.c_[logit, (box + box_mirrored) / 2],
        "logit, larger box score of both passes": np.c_[logit, np.maximum(box, box_mirrored)],
        "both means": np.c_[(logit + logit_mirrored) / 2, (box + box_mirrored) / 2],
    }
    folds = StratifiedKFold(10, shuffle=True, random_state=0)
    print(f"{len(y)} validation images, {int(y.sum())} with fracture")
    print(f"alone: logit {roc_auc_score(y, logit):.4f}, mirrored logit "
          f"{roc_auc_score(y, logit_mirrored):.4f}, box score {roc_auc_score(y, box):.4f}, "
          f"mirrored box score {roc_auc_score(y, box_mirrored):.4f}")
    for name, features_ in ways.items():
        fitted = LogisticRegression(C=1.0).fit(features_, y).predict_proba(features_)[:, 1]
        held = cross_val_predict(LogisticRegression(C=1.0), features_, y, cv=folds,
                                 method="predict_proba")[:, 1]
        print(f"{name:40s} in-sample {roc_auc_score(y, fitted):.4f}  "
              f"10-fold {roc_auc_score(y, held):.4f}")


if __name__ == "__main__":
    main()
