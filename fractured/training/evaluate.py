"""`fractured evaluate`: score a run's models on its held-out split (or another data set)
and write metrics.json, PNG plots and report.md.

The test split is the one `fractured train` wrote and never trained or calibrated on;
thresholds and temperature come from the checkpoint (fitted on validation), so the
numbers here are what the node would have said on these images. Images that cannot be
decoded are listed in the report, not silently dropped. predictions.csv keeps every
image's calibrated probability, and boxes.csv every box the detector found (in source
pixels, as the node reports them), for error analysis and to check that a bundle built
from the run (`fractured predict`) says the same.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from torch.utils.data import DataLoader

from fractured.engine.models import FractureDetector, build_classifier
from fractured.training import checkpoint
from fractured.training import config as train_config
from fractured.training.data import (
    ClassifierImages,
    DetectorImages,
    Letterboxed,
    collate_detection,
    letterbox_samples,
    trained_crop,
)
from fractured.training.datasets import DatasetError, open_dataset
from fractured.training.datasets.base import Sample
from fractured.training.evaluation import (
    classification_metrics,
    detection_metrics,
    expected_calibration_error,
    plots,
    subset_metrics,
    write_report,
)
from fractured.training.loops import Device, classifier_logits, detector_outputs
from fractured.training.run import SETTINGS_FILE, SPLIT_DIR
from fractured.training.schedule import read_history
from fractured.training.splits import load_split

log = structlog.get_logger()

BATCH = 16
PREDICTIONS_FILE = "predictions.csv"
BOXES_FILE = "boxes.csv"


def evaluate_run(run_dir: Path, out_dir: Path, *, split_name: str = "test",
                 dataset: Path | None = None, subsets: Sequence[str] = (),
                 bootstrap: int = 1000, device: str = "auto") -> Path:
    """Evaluate the run's best checkpoints; returns the report.md path.

    `dataset` evaluates on a whole other data set instead of the run's split (external
    validation). `subsets` are `column=value` filters on the data set's attributes
    (e.g. "hardware=0"); every body part is a subset too.
    """
    settings = train_config.load(run_dir / SETTINGS_FILE)
    found = {kind: run_dir / kind / checkpoint.BEST for kind in ("classifier", "detector")
             if (run_dir / kind / checkpoint.BEST).exists()}
    if not found:
        raise checkpoint.CheckpointError(f"{run_dir}: no classifier/best.pt or "
                                         "detector/best.pt (has the run been trained?)")
    states = {kind: checkpoint.load(path, kind) for kind, path in found.items()}  # type: ignore[arg-type]
    samples, data = samples_to_score(run_dir, settings, states, split_name, dataset)
    runner = Device.choose(device, amp=False, channels_last=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    figures: dict[str, Path] = {}
    unreadable: list[tuple[str, str]] = []
    if "classifier" in states:
        images = _classifier_part(states["classifier"], samples, subsets, bootstrap, runner,
                                  out_dir, metrics, figures)
        unreadable += images.unreadable
    if "detector" in states:
        images = _detector_part(states["detector"], samples, runner, out_dir, metrics, figures)
        unreadable += [item for item in images.unreadable if item not in unreadable]
    for kind in states:
        history = run_dir / kind / checkpoint.HISTORY
        if history.exists():
            figures[f"training curves ({kind})"] = plots.plot_training(
                out_dir / f"training_{kind}.png", read_history(history))
    data["unreadable"] = [{"path": path, "reason": reason} for path, reason in unreadable]
    limited = any(state.get("limited") for state in states.values())
    model = {kind: {**state["model_spec"], "checkpoint": str(found[kind]),
                    "epoch": state["epoch"], "limited": state.get("limited", False)}
             for kind, state in states.items()}
    title = f"Evaluation of {run_dir.name} on {data['evaluated']}"
    if limited:
        title += " (SMOKE RUN on a [data].limit subset)"
    report = write_report(out_dir, title=title, metrics=metrics, plots=figures, model=model,
                          data=data, trained=True)
    log.info("evaluate.done", report=str(report), images=len(samples),
             unreadable=len(unreadable))
    return report


def samples_to_score(run_dir: Path, settings: train_config.TrainSettings,
                     states: dict[str, dict[str, Any]], split_name: str,
                     dataset: Path | None) -> tuple[list[Sample], dict[str, Any]]:
    """The images to score (part `split_name` of the run's split, or all of `dataset`),
    and how they were chosen (for the report)."""
    if dataset is not None:
        sample_set = open_dataset(dataset, None)
        return list(sample_set.samples), {"dataset": str(dataset), "format": sample_set.format,
                                          "evaluated": f"all of {dataset.name}"}
    provenance = next(iter(states.values())).get("provenance", {})
    if "dataset" not in provenance:
        raise DatasetError(f"{run_dir}: the checkpoint does not name its data set; "
                           "pass --dataset")
    sample_set = open_dataset(Path(provenance["dataset"]), settings.data.format or None,
                              positive=settings.data.positive or None)
    split = load_split(run_dir / SPLIT_DIR, sample_set)
    samples = split.samples(sample_set, split_name)
    if not samples:
        raise DatasetError(f"{run_dir}: the {split_name} split is empty")
    summary = split.summary()
    data = {"dataset": provenance["dataset"], "format": sample_set.format,
            "split": split_name, "split_source": summary["source"],
            "evaluated": f"its {split_name} split",
            "images": len(samples), "fracture": sum(s.label for s in samples)}
    if split.folds is not None:
        data["fold"] = split.folds.describe()
    if summary["warning"]:
        data["leakage_warning"] = summary["warning"]
    return samples, data


@dataclass(frozen=True)
class ClassifierScores:
    """A classifier checkpoint's output on the images it could decode (`images.samples`;
    the rest are in `images.unreadable`), one value per image."""

    images: Letterboxed
    labels: np.ndarray  # 0/1
    prob: np.ndarray  # calibrated, sigmoid(logit / temperature): what the node reports
    raw: np.ndarray  # before calibration (the head's logit shift taken back out)


def score_classifier(state: dict[str, Any], samples: Sequence[Sample],
                     runner: Device) -> ClassifierScores:
    """Score `samples` with a calibrated classifier checkpoint as the node would: its own
    input size, crop and normalisation, its temperature. `evaluate` reports on these
    numbers and `fractured cv` pools them, so both score alike."""
    spec, calibration = state["model_spec"], state.get("calibration")
    if calibration is None:
        raise checkpoint.CheckpointError("classifier/best.pt has no calibration: the run "
                                         "did not finish; resume it with --resume")
    model = build_classifier(spec["variant"], 1, spec.get("members", 1))
    model.load_state_dict(state["model"])
    images = letterbox_samples(samples, spec["input_size"], crop=trained_crop(spec),
                               desc="decoding")
    loader = DataLoader(ClassifierImages(images, mean=spec["mean"], std=spec["std"]),
                        batch_size=BATCH)
    logits, labels = classifier_logits(runner.prepare(model), loader, runner)
    shift = calibration.get("logit_shift", 0.0)  # already in the head's bias
    return ClassifierScores(images=images, labels=labels.astype(int),
                            prob=_sigmoid(logits / calibration["temperature"]),
                            raw=_sigmoid(logits - shift))


def _classifier_part(state: dict[str, Any], samples: list[Sample], subsets: Sequence[str],
                     bootstrap: int, runner: Device, out_dir: Path, metrics: dict[str, Any],
                     figures: dict[str, Path]) -> Letterboxed:
    scores = score_classifier(state, samples, runner)
    images, labels, prob, raw = scores.images, scores.labels, scores.prob, scores.raw
    calibration = state["calibration"]
    temperature = calibration["temperature"]
    shift = calibration.get("logit_shift", 0.0)
    points = calibration["operating_points"]
    headline = classification_metrics(labels, prob, threshold=points["high_sensitivity"],
                                      bootstrap=bootstrap)
    metrics["classification"] = headline
    metrics["operating_points"] = achieved_points(labels, prob, points, state["settings"])
    metrics["calibration"] = {"temperature": temperature, "logit_shift": shift,
                              "ece_before": expected_calibration_error(labels, raw),
                              "ece_after": expected_calibration_error(labels, prob)}
    _write_predictions(out_dir / PREDICTIONS_FILE, images.samples, labels, prob)
    masks = subset_masks(list(images.samples), subsets)
    if masks:
        metrics["subsets"] = subset_metrics(labels, prob, masks,
                                            threshold=points["high_sensitivity"],
                                            bootstrap=bootstrap)
    figures["ROC"] = plots.plot_roc(out_dir / "roc.png", headline, metrics["operating_points"])
    figures["precision-recall"] = plots.plot_pr(out_dir / "pr.png", headline)
    figures["confusion (high-sensitivity point)"] = plots.plot_confusion(
        out_dir / "confusion.png", headline)
    figures["reliability"] = plots.plot_reliability(out_dir / "reliability.png", labels, raw,
                                                    prob, temperature=temperature, shift=shift)
    return images


def _write_predictions(path: Path, samples: Sequence[Sample], labels: np.ndarray,
                       prob: np.ndarray) -> None:
    """One row per scored image: its file, body part, label and calibrated probability."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "body_part", "label", "probability"])
        for sample, label, p in zip(samples, labels, prob, strict=True):
            writer.writerow([str(sample.path), sample.body_part, int(label), f"{float(p):.6f}"])


def _write_boxes(path: Path, images: Letterboxed,
                 found: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """One row per detected box (best first in each image): the image, its score and the
    box mapped back to the source image's pixels. An image without boxes has no row."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "score", "x0", "y0", "x1", "y1"])
        for sample, fit, (boxes, scores) in zip(images.samples, images.boxes, found,
                                                strict=True):
            for box, score in zip(boxes, scores, strict=True):
                corners = fit.box_to_source(*(float(v) for v in box))
                writer.writerow([str(sample.path), f"{float(score):.6f}",
                                 *(f"{v:.2f}" for v in corners)])


def _detector_part(state: dict[str, Any], samples: list[Sample], runner: Device,
                   out_dir: Path, metrics: dict[str, Any],
                   figures: dict[str, Path]) -> Letterboxed:
    spec, calibration = state["model_spec"], state.get("calibration") or {}
    boxed = [sample for sample in samples if sample.boxes is not None]
    model = FractureDetector(spec["backbone"], num_labels=1, input_size=spec["input_size"])
    model.load_state_dict(state["model"])
    images = letterbox_samples(boxed, spec["input_size"], crop=trained_crop(spec),
                               desc="decoding")
    loader = DataLoader(DetectorImages(images, mean=spec["mean"], std=spec["std"]),
                        batch_size=BATCH, collate_fn=collate_detection)
    found = list(detector_outputs(runner.prepare(model), loader, runner))
    _write_boxes(out_dir / BOXES_FILE, images, [(boxes, scores) for boxes, scores, _ in found])
    threshold = calibration.get("operating_points", {}).get("high_sensitivity")
    metrics["detection"] = detection_metrics([(boxes, scores) for boxes, scores, _ in found],
                                             [truth for _, _, truth in found],
                                             threshold=threshold)
    figures["FROC"] = plots.plot_froc(out_dir / "froc.png", metrics["detection"])
    return images


def achieved_points(labels: np.ndarray, prob: np.ndarray, points: dict[str, float],
              settings: dict[str, Any]) -> dict[str, Any]:
    """Sensitivity and specificity reached here at the thresholds fitted on validation."""
    targets = {"high_sensitivity": settings["classifier"]["target_sensitivity"],
               "high_specificity": settings["classifier"]["target_specificity"]}
    result: dict[str, Any] = {"note": "thresholds fitted on the validation split"}
    for name, threshold in points.items():
        called = prob >= threshold
        positives, negatives = labels == 1, labels == 0
        result[name] = {
            "threshold": threshold, "target": targets[name],
            "sensitivity": float(called[positives].mean()) if positives.any() else None,
            "specificity": float((~called[negatives]).mean()) if negatives.any() else None,
        }
    return result


def subset_masks(samples: list[Sample], filters: Sequence[str]) -> dict[str, np.ndarray]:
    """Every body part, then each `column=value` filter on the samples' attributes."""
    masks = {f"body_part == {part}": np.array([s.body_part == part for s in samples])
             for part in sorted({s.body_part for s in samples if s.body_part})}
    for text in filters:
        column, sep, value = text.partition("=")
        column, value = column.strip(), value.strip()
        if not sep or not column:
            raise DatasetError(f"--subset {text!r}: expected column=value")
        if not any(column in s.attributes for s in samples):
            known = sorted({key for s in samples for key in s.attributes})
            raise DatasetError(f"--subset {text!r}: no image has a {column!r} column "
                               f"(columns: {', '.join(known) or 'none'})")
        masks[f"{column} == {value}"] = np.array(
            [s.attributes.get(column) == value for s in samples])
    return masks


def _sigmoid(values: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-values))
