"""Does the box detector's best score add to the classifier's image probability?

Runs a bundle with both models (ONNX Runtime, as the node does) on the validation and
test images of a run's split: per image the classifier's calibrated logit and the
detector's best raw box score (every box the graph returns, not only those over its
operating point). A logistic regression of the two is fitted on validation and scored
on test against the classifier alone, with a paired bootstrap interval of the AUC
difference, over all test images and those without orthopaedic hardware. Per-image
features are kept in OUT so that the scoring reruns in a second. From the repository root:

    .venv/bin/python docs/training/fracatlas-ensemble/fusion.py engines/fractured-0.3.0 \
        docs/training/fracatlas-resnet18-e50/split.csv ../shared/data/fracatlas runs/fusion
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fractured.engine.backends import open_models
from fractured.engine.bundle import Bundle
from fractured.engine.preprocess import DecodeError, letterbox, to_model_input
from fractured.engine.sources import load_image

RESAMPLES = 2000
FIELDS = ("image", "label", "hardware", "logit", "box_score")


def measure(bundle: Bundle, split: Path, dataset: Path, part: str, out: Path) -> Path:
    """OUT/PART.csv: the two features of every readable image of one split part."""
    target = out / f"{part}.csv"
    if target.exists():
        return target
    with open(dataset / "manifest.csv", newline="") as fh:
        hardware = {row["image"]: row["hardware"] for row in csv.DictReader(fh)}
    with open(split, newline="") as fh:
        rows = [row for row in csv.DictReader(fh) if row["split"] == part]
    manifest = bundle.manifest
    assert manifest.detector is not None, f"{bundle.path} has no detector"
    engines = open_models(bundle, "onnxruntime", threads=2)
    assert engines.detector is not None
    sizes = manifest.classifier.input_size, manifest.detector.input_size
    out.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".part"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(FIELDS)
        for index, row in enumerate(rows):
            try:
                pixels = load_image(dataset / row["relative_path"]).pixels
            except DecodeError:
                continue  # truncated FracAtlas JPEGs: left out of training and evaluation too
            inputs = [to_model_input([letterbox(pixels, size)[0]], manifest.mean, manifest.std)
                      for size in sizes]
            logits, _ = engines.classifier.run(inputs[0])
            _, scores, labels = engines.detector.run(inputs[1])
            real = scores[0][labels[0] >= 1]  # padding slots have label 0
            name = Path(row["relative_path"]).name
            writer.writerow([name, row["label"], hardware[name],
                             f"{logits[0][0] / manifest.classifier.temperature:.6f}",
                             f"{real.max() if real.size else 0.0:.6f}"])
            if index % 100 == 0:
                print(f"  {part}: {index}/{len(rows)}", flush=True)
    target.with_suffix(".part").rename(target)
    return target


def features(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[logit, best box score] per image, labels, and whether hardware is present."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    x = np.array([[float(row["logit"]), float(row["box_score"])] for row in rows])
    return (x, np.array([int(row["label"]) for row in rows]),
            np.array([row["hardware"] == "1" for row in rows]))


def paired_bootstrap(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """95 % interval of AUC(b) - AUC(a) over resampled images."""
    rng = np.random.default_rng(0)
    diffs = []
    for _ in range(RESAMPLES):
        pick = rng.integers(0, len(y), len(y))
        if 0 < y[pick].sum() < len(pick):
            diffs.append(roc_auc_score(y[pick], b[pick]) - roc_auc_score(y[pick], a[pick]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(low), float(high)


def main(bundle_dir: Path, split: Path, dataset: Path, out: Path) -> None:
    bundle = Bundle.load(bundle_dir)
    x_val, y_val, _ = features(measure(bundle, split, dataset, "val", out))
    x_test, y_test, hardware = features(measure(bundle, split, dataset, "test", out))
    fused = LogisticRegression().fit(x_val, y_val)
    print(f"fitted on validation ({len(y_val)} images): logit weight {fused.coef_[0][0]:.3f}, "
          f"box-score weight {fused.coef_[0][1]:.3f}, intercept {fused.intercept_[0]:.3f}")
    print(f"validation AUC: classifier {roc_auc_score(y_val, x_val[:, 0]):.4f}, "
          f"fused {roc_auc_score(y_val, fused.decision_function(x_val)):.4f}")
    scores = {"classifier": x_test[:, 0], "best box score": x_test[:, 1],
              "fused": fused.decision_function(x_test)}
    for subset, mask in (("all", np.ones(len(y_test), bool)), ("hardware = 0", ~hardware)):
        print(f"test, {subset} ({mask.sum()} images, {y_test[mask].sum()} fractures):")
        for label, score in scores.items():
            print(f"  {label:15s} AUC {roc_auc_score(y_test[mask], score[mask]):.4f}")
        low, high = paired_bootstrap(y_test[mask], scores["classifier"][mask],
                                     scores["fused"][mask])
        print(f"  fused - classifier: 95 % interval {low:+.4f} to {high:+.4f}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    main(*map(Path, sys.argv[1:5]))
