"""Screening on the validation part only: a classifier run's validation predictions
against the shipped classifier (0.2.0, ResNet18 from scratch) and the shipped fused
probability (0.7.0/0.8.1) on the same 480 images, paired.

    python docs/training/fracatlas-lite0-256/compare.py RUN/eval-val/predictions.csv

The shipped models' validation scores come from the fusion report's validation.csv
(docs/training/fracatlas-fusion-det512/test/validation.csv). The test part is not read.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from fractured.training.evaluation.classification import auc_interval, paired_auc_difference

SHIPPED = Path(__file__).parent.parent / "fracatlas-fusion-det512/test/validation.csv"


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {Path(row["image"]).name: row for row in csv.DictReader(fh)}


def main(candidate: Path) -> None:
    shipped, new = _rows(SHIPPED), _rows(candidate)
    names = sorted(set(shipped) & set(new))
    if len(names) != len(shipped):
        sys.exit(f"{candidate}: {len(names)} of the {len(shipped)} validation images match")
    labels = np.array([int(shipped[name]["label"]) for name in names])
    parts = np.array([shipped[name]["body_part"] for name in names])
    column = "probability" if "probability" in next(iter(new.values())) else "prob"
    scores = {"ResNet18 scratch (0.2.0)": [shipped[n]["classifier_probability"] for n in names],
              "0.2.0 + detector fused (0.7.0)": [shipped[n]["probability"] for n in names],
              "candidate": [new[n][column] for n in names]}
    scores = {key: np.array(values, dtype=float) for key, values in scores.items()}
    print(f"validation: {len(names)} images, {labels.sum()} fractures\n")
    print("| Model | Validation AUC (95 % CI) | " + " | ".join(
        f"{part} ({int(labels[parts == part].sum())}/{int((parts == part).sum())})"
        for part in ("hand", "leg", "hip", "shoulder", "mixed")) + " |")
    print("| --- | --- |" + " --- |" * 5)
    for name, score in scores.items():
        auc = roc_auc_score(labels, score)
        low, high = auc_interval(labels, score, 2000, 0)
        cells = []
        for part in ("hand", "leg", "hip", "shoulder", "mixed"):
            mask = parts == part
            both = 0 < labels[mask].sum() < mask.sum()
            cells.append(f"{roc_auc_score(labels[mask], score[mask]):.3f}" if both else "-")
        print(f"| {name} | {auc:.3f} ({low:.3f}-{high:.3f}) | " + " | ".join(cells) + " |")
    for reference in ("ResNet18 scratch (0.2.0)", "0.2.0 + detector fused (0.7.0)"):
        diff = paired_auc_difference(labels, scores[reference], scores["candidate"],
                                     bootstrap=2000)
        low, high = diff["difference_ci95"]
        print(f"\ncandidate - {reference}: {diff['difference']:+.3f} "
              f"(paired 95 % CI {low:+.3f} to {high:+.3f})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
