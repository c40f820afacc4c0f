"""`fractured fuse`: the detector's best box score joined to the classifier's probability.

A box detector that is confident of a box somewhere on an image knows something an
image classifier may miss; on FracAtlas a logistic regression of the two lifted the
held-out AUC of the shipped classifier (docs/training/fracatlas-ensemble/NOTES.md). This
module fits that regression for a bundle that has both models and scores it:

- the two numbers per image (the calibrated classifier logit and the best box score)
  come from the node's own `Pipeline.evidence` on the bundle's graphs, so the weights
  are fitted on exactly what the node will compute;
- they are fitted on the validation part of the split the classifier was trained with
  (refused when the split's counts differ from the bundle's training record: fitting on
  training images would flatter the fusion), and the two operating points are chosen
  again on the fused probability with the classifier's own targets;
- the test part is scored as `fractured evaluate` scores a run (metrics.json, report.md,
  plots, predictions.csv), the classifier alone beside it and a paired bootstrap
  interval of the AUC difference, so ML staff see whether fusion helped on images it
  was not fitted on before they roll the bundle out.

`build.build_fused_bundle` writes the new bundle (the same model files, a manifest with
`classifier.fusion`); `Fusion` in engine.bundle is the formula both sides use.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from sklearn.linear_model import LogisticRegression
from tqdm import tqdm

from fractured.engine.bundle import Bundle, Fusion
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import load_image
from fractured.training.datasets import DatasetError, open_dataset
from fractured.training.datasets.base import Sample
from fractured.training.evaluate import achieved_points, subset_masks
from fractured.training.evaluation import (
    choose_operating_points,
    classification_metrics,
    expected_calibration_error,
    paired_auc_difference,
    plots,
    subset_metrics,
    write_report,
)
from fractured.training.export import BuildError
from fractured.training.splits import load_split

log = structlog.get_logger()

#: Inverse L2 strength of the regression (scikit-learn's default, stated): three
#: parameters fitted on hundreds of images need little of it, and it keeps the weights
#: finite on a validation set the two scores separate perfectly.
REGULARISATION_C = 1.0
#: The classifier's operating-point targets, where its training record has none.
DEFAULT_TARGETS = {"sensitivity": 0.95, "specificity": 0.90}
#: Images between two `fuse.progress` log lines (15-40 s on 2 cores).
PROGRESS_EVERY = 100
PREDICTIONS_FILE = "predictions.csv"
VALIDATION_FILE = "validation.csv"
_COLUMNS = ("image", "body_part", "label", "logit", "box_score", "classifier_probability",
            "probability")


@dataclass(frozen=True)
class Measured:
    """The readable images of one split part and the pipeline's evidence on each."""

    samples: tuple[Sample, ...]
    evidence: np.ndarray  # (n, 2): calibrated classifier logit, best box score
    labels: np.ndarray  # (n,) 0/1
    unreadable: tuple[tuple[str, str], ...]  # (path, reason)


@dataclass(frozen=True)
class FusionResult:
    """What `fuse` found: the weights, the operating points on the fused probability,
    and the records the new bundle's manifest and model card keep."""

    source: Bundle
    fusion: Fusion
    operating_points: dict[str, float]  # high_sensitivity, high_specificity
    summary: dict[str, Any]  # training.fusion of the new manifest
    report: dict[str, Any]  # the metrics.json written (for the held-out summary)
    report_path: Path


def measure(pipeline: Pipeline, samples: Sequence[Sample], *, desc: str) -> Measured:
    """Run the pipeline over `samples`, `pipeline.max_batch` images at a time; images
    that cannot be decoded are left out and listed, as evaluate does."""
    kept: list[Sample] = []
    rows: list[np.ndarray] = []
    unreadable: list[tuple[str, str]] = []
    batch: list[tuple[Sample, np.ndarray]] = []

    def flush() -> None:
        if batch:
            rows.append(pipeline.evidence([pixels for _, pixels in batch]))
            kept.extend(sample for sample, _ in batch)
            batch.clear()

    for index, sample in enumerate(tqdm(samples, desc=desc, unit="img", disable=None,
                                        mininterval=5.0)):
        if index % PROGRESS_EVERY == 0:  # tqdm draws only on a terminal; logs go anywhere
            log.info("fuse.progress", part=desc, done=index, total=len(samples))
        try:
            batch.append((sample, load_image(sample.path).pixels))
        except DecodeError as exc:
            unreadable.append((str(sample.path), str(exc)))
            log.warning("fuse.image_unreadable", path=str(sample.path), reason=str(exc))
            continue
        if len(batch) == pipeline.max_batch:
            flush()
    flush()
    evidence = np.concatenate(rows) if rows else np.empty((0, 2))
    return Measured(tuple(kept), evidence, np.array([s.label for s in kept], dtype=np.int64),
                    tuple(unreadable))


def fit_fusion(evidence: np.ndarray, labels: np.ndarray) -> Fusion:
    """The logistic regression of fracture on [calibrated logit, best box score].

    Refused (BuildError) when either weight comes out negative: a classifier whose
    fracture logit lowers the probability, or a detector whose confident boxes do, is a
    broken model or a wrong split, not something to ship with a formula that hides it.
    """
    if len(np.unique(labels)) < 2:
        raise BuildError(f"cannot fit a fusion on {len(labels)} images of one class: both "
                         "fractures and normals are needed")
    model = LogisticRegression(C=REGULARISATION_C).fit(evidence, labels)
    logit_weight, box_weight = (float(w) for w in model.coef_[0])
    fusion = Fusion(logit_weight=logit_weight, box_weight=box_weight,
                    intercept=float(model.intercept_[0]))
    if logit_weight <= 0 or box_weight < 0:
        raise BuildError(f"the fitted fusion weighs the classifier's logit {logit_weight:.3f} "
                         f"and the box score {box_weight:.3f}: a fracture score that lowers "
                         "the probability means a broken model or the wrong split; not fused")
    return fusion


def fused_probability(fusion: Fusion, evidence: np.ndarray) -> np.ndarray:
    return _sigmoid(fusion.logit(evidence[:, 0], evidence[:, 1]))


def fuse(source: Path, split_dir: Path, report_dir: Path, *, dataset: Path | None = None,
         subsets: Sequence[str] = (), bootstrap: int = 1000, backend: str = "onnxruntime",
         threads: int | None = None) -> FusionResult:
    """Fit the fusion of bundle `source` on the validation part of `split_dir` and score
    it on the test part; the report (metrics.json, report.md, plots, predictions.csv,
    validation.csv) goes to `report_dir`."""
    bundle = Bundle.load(source)
    manifest = bundle.manifest
    label = f"{manifest.name}-{manifest.version}"
    if not manifest.trained:
        raise BuildError(f"{source}: an untrained bundle has nothing to fuse")
    if manifest.detector is None:
        raise BuildError(f"{source}: has no box detector, so there is no box score to fuse")
    if manifest.classifier.fusion is not None:
        raise BuildError(f"{source}: already fused; fuse the bundle it was made from")
    record = dict(manifest.training.get("classifier") or {})
    data_record = record.get("data") or {}
    dataset = dataset or (Path(data_record["dataset"]) if data_record.get("dataset") else None)
    if dataset is None:
        raise BuildError(f"{source}: its training record names no data set; pass --dataset")
    sample_set = open_dataset(dataset, data_record.get("format"))
    split = load_split(split_dir, sample_set)
    parts = {name: split.samples(sample_set, name) for name in ("train", "val", "test")}
    _check_same_split(parts, data_record, split_dir, label)
    subset_masks(parts["test"], subsets)  # a wrong --subset fails now, not after inference

    pipeline = Pipeline(bundle, backend=backend, threads=threads, boxes="always")
    log.info("fuse.start", bundle=label, backend=pipeline.backend_name,
             val=len(parts["val"]), test=len(parts["test"]))
    val = measure(pipeline, parts["val"], desc="validation")
    test = measure(pipeline, parts["test"], desc="test")
    fusion = fit_fusion(val.evidence, val.labels)
    settings = record.get("settings") or {}
    targets = {"sensitivity": settings.get("target_sensitivity",
                                           DEFAULT_TARGETS["sensitivity"]),
               "specificity": settings.get("target_specificity",
                                           DEFAULT_TARGETS["specificity"])}
    val_prob = fused_probability(fusion, val.evidence)
    points, achieved = choose_operating_points(val.labels, val_prob, **targets)
    chosen = {"high_sensitivity": points.high_sensitivity,
              "high_specificity": points.high_specificity}
    log.info("fuse.fitted", logit_weight=round(fusion.logit_weight, 4),
             box_weight=round(fusion.box_weight, 4), intercept=round(fusion.intercept, 4),
             high_sensitivity=round(points.high_sensitivity, 4),
             high_specificity=round(points.high_specificity, 4))

    report_dir.mkdir(parents=True, exist_ok=True)
    _write_rows(report_dir / VALIDATION_FILE, val, fusion)
    _write_rows(report_dir / PREDICTIONS_FILE, test, fusion)
    test_prob = fused_probability(fusion, test.evidence)
    alone = _sigmoid(test.evidence[:, 0])
    masks = subset_masks(list(test.samples), subsets)
    comparison = {
        "validation": paired_auc_difference(val.labels, val.evidence[:, 0], val_prob,
                                            bootstrap=0),
        "test": paired_auc_difference(test.labels, test.evidence[:, 0], test_prob,
                                      bootstrap=bootstrap),
        **{f"test, {name}": paired_auc_difference(test.labels[mask], test.evidence[mask, 0],
                                                  test_prob[mask], bootstrap=bootstrap)
           for name, mask in masks.items() if not name.startswith("body_part")},
    }
    summary = {
        "source": label,
        "weights": {"logit_weight": fusion.logit_weight, "box_weight": fusion.box_weight,
                    "intercept": fusion.intercept},
        "regularisation_c": REGULARISATION_C,
        "fitted_on": {"split": "val", "split_source": str(split_dir), "n": len(val.labels),
                      "positives": int(val.labels.sum()), "unreadable": len(val.unreadable)},
        "achieved_on_val": achieved,
        "auc": comparison,
        "report": str(report_dir / "metrics.json"),
    }
    headline = classification_metrics(test.labels, test_prob, threshold=points.high_sensitivity,
                                      bootstrap=bootstrap)
    metrics: dict[str, Any] = {
        "classification": headline,
        "operating_points": achieved_points(test.labels, test_prob, chosen,
                                            {"classifier": {
                                                "target_sensitivity": targets["sensitivity"],
                                                "target_specificity": targets["specificity"]}}),
        "calibration": {
            "formula": (f"probability = {fusion.formula()}, fitted on validation; "
                        "before: the classifier's probability alone"),
            "temperature": manifest.classifier.temperature,
            "ece_before": expected_calibration_error(test.labels, alone),
            "ece_after": expected_calibration_error(test.labels, test_prob)},
        "fusion": summary,
    }
    if masks:
        metrics["subsets"] = subset_metrics(test.labels, test_prob, masks,
                                            threshold=points.high_sensitivity,
                                            bootstrap=bootstrap)
    figures = {
        "ROC": plots.plot_roc(report_dir / "roc.png", headline, metrics["operating_points"]),
        "precision-recall": plots.plot_pr(report_dir / "pr.png", headline),
        "confusion (high-sensitivity point)": plots.plot_confusion(
            report_dir / "confusion.png", headline),
        "reliability (before: classifier alone; after: fused)": plots.plot_reliability(
            report_dir / "reliability.png", test.labels, alone, test_prob),
    }
    unreadable = [{"path": path, "reason": reason} for path, reason in test.unreadable]
    data = {"dataset": str(dataset), "format": sample_set.format, "split": "test",
            "split_source": str(split_dir), "evaluated": "its test split",
            "images": len(parts["test"]), "fracture": sum(s.label for s in parts["test"]),
            "fitted_on": f"its val split ({len(val.labels)} readable images, "
                         f"{len(val.unreadable)} unreadable)",
            "unreadable": unreadable}
    report = write_report(report_dir, title=f"Fusion of {label}'s classifier and detector "
                          "on its test split", metrics=metrics, plots=figures,
                          model={"bundle": str(source), "backend": pipeline.backend_name},
                          data=data, trained=True)
    log.info("fuse.scored", report=str(report),
             **{f"{part}_auc_{key}": round(comparison[part][key], 4)
                for part in ("validation", "test") for key in ("before", "after")
                if comparison[part][key] is not None})
    written = _read_json(report_dir / "metrics.json")
    return FusionResult(source=bundle, fusion=fusion, operating_points=chosen,
                        summary=summary, report=written, report_path=report_dir / "metrics.json")


def _check_same_split(parts: dict[str, list[Sample]], record: dict[str, Any],
                      split_dir: Path, label: str) -> None:
    """The split must be the classifier's own: its part sizes as the bundle recorded."""
    found = {"train_images": len(parts["train"]),
             "train_positive": sum(s.label for s in parts["train"]),
             "val_images": len(parts["val"]), "val_positive": sum(s.label for s in parts["val"])}
    recorded = {key: record.get(key) for key in found}
    if found != recorded:
        raise DatasetError(f"{split_dir}: its parts ({found}) are not those {label}'s "
                           f"classifier was trained and calibrated with ({recorded}); "
                           "fitting on images it trained on would flatter the fusion")
    if not parts["test"]:
        raise DatasetError(f"{split_dir}: the test part is empty, so nothing would score "
                           "the fusion on images it was not fitted on")


def _write_rows(path: Path, measured: Measured, fusion: Fusion) -> None:
    """One row per scored image: the two inputs of the fusion and both probabilities."""
    fused = fused_probability(fusion, measured.evidence)
    alone = _sigmoid(measured.evidence[:, 0])
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(_COLUMNS)
        for i, sample in enumerate(measured.samples):
            writer.writerow([str(sample.path), sample.body_part, int(measured.labels[i]),
                             f"{measured.evidence[i, 0]:.6f}", f"{measured.evidence[i, 1]:.6f}",
                             f"{alone[i]:.6f}", f"{fused[i]:.6f}"])


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * values))
