"""A built bundle scored on the split its classifier was trained with, as the node runs it.

`fractured fuse` and `fractured quantize` both make a new bundle from one in service and
must show, before it is rolled out, what it says on images it was not fitted on. They
share this: the split's parts (refused unless they are the ones the bundle's training
record names, since fitting or checking on training images would flatter the result),
the pipeline's evidence per image (the node's own numbers: `Pipeline.evidence`), the
probability a bundle makes of it, and a held-out report in the form `fractured
evaluate` writes (metrics.json, report.md, plots, predictions.csv), which
`build.records.held_out_summary` turns into the new bundle's held-out record.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
from tqdm import tqdm

from fractured.engine.bundle import Bundle, DetectorSpec
from fractured.engine.exposed_field import Field, exposed_field
from fractured.engine.findings import Box, OperatingPoints
from fractured.engine.pipeline import Detections, Examination, Pipeline
from fractured.engine.preprocess import DecodeError
from fractured.engine.region_check import RegionSeen
from fractured.engine.regions import Region, region_of
from fractured.engine.sources import LoadedImage, load_image
from fractured.training.config import ClassifierSettings
from fractured.training.data import model_boxes
from fractured.training.datasets import DatasetError, open_dataset
from fractured.training.datasets.base import Sample
from fractured.training.evaluate import achieved_points, subset_masks
from fractured.training.evaluation import (
    RegionRule,
    classification_metrics,
    detection_metrics,
    expected_calibration_error,
    plots,
    subset_metrics,
    write_report,
)
from fractured.training.export import BuildError
from fractured.training.splits import load_split

if TYPE_CHECKING:  # node_assessment reads this module's Measured
    from fractured.training.node_assessment import NodeView

log = structlog.get_logger()

#: The classifier's operating-point targets, where its training record has none.
DEFAULT_TARGETS = {"sensitivity": 0.95, "specificity": 0.90}
#: Images between two `score.progress` log lines (15-40 s on 2 cores).
PROGRESS_EVERY = 100
PREDICTIONS_FILE = "predictions.csv"
VALIDATION_FILE = "validation.csv"


@dataclass(frozen=True)
class Measured:
    """The readable images of one split part and the pipeline's evidence on each."""

    samples: tuple[Sample, ...]
    evidence: np.ndarray  # (n, 2): calibrated classifier logit, best box score
    labels: np.ndarray  # (n,) 0/1
    unreadable: tuple[tuple[str, str], ...]  # (path, reason)
    detections: tuple[Detections, ...]  # every box returned per image; () without detector
    boxes: tuple[tuple[Box, ...], ...]  # per image, the boxes the node draws before gating
    peaks: tuple[tuple[float, float] | None, ...]  # per image, the heatmap's peak (x, y)
    fields: tuple[Field, ...]  # per image, its exposed field (engine.exposed_field)
    shapes: tuple[tuple[int, int], ...]  # per image, (rows, columns) of the source
    #: per image, what the bundle's region check saw (none without one)
    seen: tuple[RegionSeen | None, ...] = ()


@dataclass(frozen=True)
class SplitParts:
    """The data set and the split of a bundle's classifier, checked against its record."""

    dataset: Path
    format: str
    split_dir: Path
    parts: Mapping[str, list[Sample]]  # train, val, test
    targets: Mapping[str, float]  # the classifier's sensitivity / specificity targets
    region_rule: RegionRule  # and its region settings, for points per body region


def open_split(bundle: Bundle, split_dir: Path, dataset: Path | None,
               subsets: Sequence[str] = ()) -> SplitParts:
    """The parts of `split_dir` over `dataset` (default: the one the bundle's classifier
    was trained on), refused unless their sizes are the ones the bundle recorded; a
    `--subset` naming no column fails here, before minutes of inference."""
    manifest = bundle.manifest
    label = f"{manifest.name}-{manifest.version}"
    record = dict(manifest.training.get("classifier") or {})
    data_record = record.get("data") or {}
    if dataset is None and data_record.get("dataset"):
        dataset = Path(data_record["dataset"])
    if dataset is None:
        raise BuildError(f"{bundle.path}: its training record names no data set; pass "
                         "--dataset")
    sample_set = open_dataset(dataset, data_record.get("format"))
    split = load_split(split_dir, sample_set)
    parts = {name: split.samples(sample_set, name) for name in ("train", "val", "test")}
    found = {"train_images": len(parts["train"]),
             "train_positive": sum(s.label for s in parts["train"]),
             "val_images": len(parts["val"]), "val_positive": sum(s.label for s in parts["val"])}
    recorded = {key: data_record.get(key) for key in found}
    if found != recorded:
        raise DatasetError(f"{split_dir}: its parts ({found}) are not those {label}'s "
                           f"classifier was trained and calibrated with ({recorded}); "
                           "fitting or checking on images it trained on would flatter it")
    if not parts["test"]:
        raise DatasetError(f"{split_dir}: the test part is empty, so nothing would score "
                           "the new bundle on images it was not fitted on")
    subset_masks(parts["test"], subsets)
    settings = record.get("settings") or {}
    targets = {"sensitivity": settings.get("target_sensitivity",
                                           DEFAULT_TARGETS["sensitivity"]),
               "specificity": settings.get("target_specificity",
                                           DEFAULT_TARGETS["specificity"])}
    defaults = ClassifierSettings()
    rule = RegionRule(*(settings.get(key, getattr(defaults, key)) for key in (
        "region_min_fractures", "region_min_normals", "region_min_specificity")))
    return SplitParts(dataset, sample_set.format, Path(split_dir), parts, targets, rule)


def measure(pipelines: Mapping[str, Pipeline], samples: Sequence[Sample], *,
            desc: str) -> dict[str, Measured]:
    """Run each pipeline over `samples`: each image is decoded once for all of them and
    sent to each in batches; images that cannot be decoded are left out and listed, as
    evaluate does."""
    kept: list[Sample] = []
    found: dict[str, list[Examination]] = {name: [] for name in pipelines}
    fields: list[Field] = []
    shapes: list[tuple[int, int]] = []
    unreadable: list[tuple[str, str]] = []
    batch: list[tuple[Sample, LoadedImage]] = []
    size = min(pipeline.max_batch for pipeline in pipelines.values())

    def flush() -> None:
        if batch:
            for name, pipeline in pipelines.items():
                found[name].append(pipeline.examine([image.pixels for _, image in batch],
                                                    [image.dataset for _, image in batch]))
            kept.extend(sample for sample, _ in batch)
            fields.extend(exposed_field(image.pixels, image.dataset) for _, image in batch)
            shapes.extend(image.pixels.shape for _, image in batch)
            batch.clear()

    for index, sample in enumerate(tqdm(samples, desc=desc, unit="img", disable=None,
                                        mininterval=5.0)):
        if index % PROGRESS_EVERY == 0:  # tqdm draws only on a terminal; logs go anywhere
            log.info("score.progress", part=desc, done=index, total=len(samples),
                     models=[pipeline.model.label for pipeline in pipelines.values()])
        try:
            batch.append((sample, load_image(sample.path)))
        except DecodeError as exc:
            unreadable.append((str(sample.path), str(exc)))
            log.warning("score.image_unreadable", path=str(sample.path), reason=str(exc))
            continue
        if len(batch) == size:
            flush()
    flush()
    labels = np.array([s.label for s in kept], dtype=np.int64)
    return {name: Measured(
        tuple(kept), np.concatenate([one.evidence for one in found[name]]) if found[name]
        else np.empty((0, 2)), labels, tuple(unreadable),
        tuple(d for one in found[name] for d in one.detections),
        tuple(b for one in found[name] for b in one.boxes),
        tuple(p for one in found[name] for p in one.peaks), tuple(fields), tuple(shapes),
        tuple(s for one in found[name] for s in one.seen))
        for name in pipelines}


def detection_scores(measured: Measured, spec: DetectorSpec) -> dict[str, Any]:
    """A detector scored on the measured images that carry boxes, as `fractured evaluate`
    scores a detector checkpoint: every box its graph returned against the true boxes,
    both in model-input pixels, and the numbers at its high-sensitivity point
    (`detection_metrics`)."""
    if len(measured.detections) != len(measured.samples):
        raise BuildError("the measured bundle has no detector to score")
    pairs = [(found, sample) for found, sample in zip(measured.detections, measured.samples,
                                                      strict=True) if sample.boxes is not None]
    return detection_metrics([(found.boxes, found.scores) for found, _ in pairs],
                             [model_boxes(sample, found.fit) for found, sample in pairs],
                             threshold=spec.operating_points.high_sensitivity)


def write_rows(path: Path, measured: Measured, columns: Mapping[str, np.ndarray]) -> None:
    """One row per scored image: its path, body part, label, the evidence and `columns`."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "body_part", "label", "logit", "box_score", *columns])
        for i, sample in enumerate(measured.samples):
            writer.writerow([str(sample.path), sample.body_part, int(measured.labels[i]),
                             f"{measured.evidence[i, 0]:.6f}", f"{measured.evidence[i, 1]:.6f}",
                             *(f"{values[i]:.6f}" for values in columns.values())])


@dataclass(frozen=True)
class Reference:
    """What the new probability is compared with in the report: its name and values."""

    name: str
    probability: np.ndarray


def write_test_report(report_dir: Path, *, title: str, split: SplitParts, test: Measured,
                      probability: np.ndarray, reference: Reference,
                      points: Mapping[str, float], temperature: float, formula: str,
                      subsets: Sequence[str], bootstrap: int, sections: Mapping[str, Any],
                      model: Mapping[str, Any], data: Mapping[str, Any],
                      node: NodeView) -> dict[str, Any]:
    """metrics.json, report.md and the plots of `probability` on the test part, with
    `reference` as the calibration's "before"; `sections` (e.g. "fusion") are added to
    metrics.json and the report, and so is `node`'s assessment of what the node shows
    (per region, boxes, heatmap) on the test part and on validation and test pooled.
    Returns what metrics.json holds."""
    headline = classification_metrics(test.labels, probability,
                                      threshold=points["high_sensitivity"],
                                      bootstrap=bootstrap)
    settings = {"classifier": {"target_sensitivity": split.targets["sensitivity"],
                               "target_specificity": split.targets["specificity"]}}
    metrics: dict[str, Any] = {
        "classification": headline,
        "operating_points": achieved_points(test.labels, probability, dict(points), settings),
        "calibration": {
            "formula": f"{formula}; before: {reference.name}", "temperature": temperature,
            "ece_before": expected_calibration_error(test.labels, reference.probability),
            "ece_after": expected_calibration_error(test.labels, probability)},
        **sections,
        "node": node.assessed(test, probability, bootstrap),
    }
    masks = subset_masks(list(test.samples), subsets)
    if masks:
        metrics["subsets"] = subset_metrics(test.labels, probability, masks,
                                            threshold=points["high_sensitivity"],
                                            bootstrap=bootstrap)
    figures = {
        "ROC": plots.plot_roc(report_dir / "roc.png", headline, metrics["operating_points"]),
        "precision-recall": plots.plot_pr(report_dir / "pr.png", headline),
        "confusion (high-sensitivity point)": plots.plot_confusion(
            report_dir / "confusion.png", headline),
        f"reliability (before: {reference.name})": plots.plot_reliability(
            report_dir / "reliability.png", test.labels, reference.probability, probability),
    }
    tested = split.parts["test"]
    record = {"dataset": str(split.dataset), "format": split.format, "split": "test",
              "split_source": str(split.split_dir), "evaluated": "its test split",
              "images": len(tested), "fracture": sum(s.label for s in tested), **data,
              "unreadable": [{"path": path, "reason": reason}
                             for path, reason in test.unreadable]}
    write_report(report_dir, title=title, metrics=metrics, plots=figures, model=model,
                 data=record, trained=True)
    return json.loads((report_dir / "metrics.json").read_text(encoding="utf-8"))


def masks_for(test: Measured, subsets: Sequence[str]) -> dict[str, np.ndarray]:
    """The subsets' masks over the readable test images."""
    return subset_masks(list(test.samples), subsets)


def changes(reference: Measured, other: Measured, before: np.ndarray, after: np.ndarray,
            points_for: Callable[[Region | None], tuple[OperatingPoints, Any]],
            ) -> dict[str, Any]:
    """How far `other` (INT8 graphs, another device) moved each image's numbers and
    decisions from `reference`, the same images run by both; `before` and `after` are
    their probabilities. Each image is decided at the points the node gives its body
    region (`points_for`, as `ClassifierSpec.points_for`)."""
    points = [points_for(region_of(sample.body_part))[0]
              for sample in other.samples]
    thresholds = {name: np.array([getattr(p, name) for p in points]) for name in (
        "high_sensitivity", "high_specificity")}
    return {
        "images": len(after),
        "max_logit_change": float(np.abs(other.evidence[:, 0]
                                         - reference.evidence[:, 0]).max()),
        "max_box_score_change": float(np.abs(other.evidence[:, 1]
                                             - reference.evidence[:, 1]).max()),
        "max_probability_change": float(np.abs(after - before).max()),
        "decisions_changed": {name: int(((before >= t) != (after >= t)).sum())
                              for name, t in thresholds.items()},
    }
