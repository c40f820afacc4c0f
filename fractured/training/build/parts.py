"""The two models of a bundle being built, each with its manifest entry and files.

A classifier or detector part comes from a `fractured train` checkpoint (exported to
ONNX and compared with its PyTorch model before anything is written) or is taken as it
is from an existing bundle; build-engine (build.checkpoints) joins one of each kind.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from fractured.engine.bundle import (
    BY_REGION,
    CLASSIFIER_FILE,
    CLASSIFIER_WEIGHTS,
    DETECTOR_FILE,
    DETECTOR_WEIGHTS,
    Bundle,
    ClassifierSpec,
    DetectorSpec,
    flag_rates,
    points_by_region,
)
from fractured.engine.intended_use import IntendedUse
from fractured.engine.models import FractureDetector, build_classifier
from fractured.engine.region_check import REGION_CHECK_FILE
from fractured.training.build.records import training_summary
from fractured.training.build.writer import points, triple
from fractured.training.data import trained_crop
from fractured.training.evaluation.report import jsonable
from fractured.training.export import (
    DETECTOR_SCORE_TOLERANCE,
    FLOAT16_PARITY_TOLERANCE,
    PARITY_TOLERANCE,
    BuildError,
    check_detector_parity,
    check_parity,
    export_classifier,
    export_detector,
    round_to_float16,
    store_weights_as_float16,
    synthetic_images,
)
from fractured.training.intended_use import intended_use
from fractured.training.region_check import build_region_check

log = structlog.get_logger()
#: Validation images (fractures first) the detector's ONNX graph is compared on.
PARITY_IMAGES = 4


@dataclass(frozen=True)
class ClassifierPart:
    """A bundle's classifier, built from a checkpoint or taken from another bundle."""

    entry: ClassifierSpec
    files: dict[str, Path]
    training: dict[str, Any]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dataset: Path | None  # whose credits the model card gives
    crop: str  # what the classifier was trained on (exposed_field.CROPS)
    intended_use: IntendedUse | None
    held_out: dict[str, Any] | None = None  # a reused classifier's held-out scores


def built_classifier(path: Path, state: dict[str, Any], scratch: Path, *,
                     float16_weights: bool, region_check: bool = False) -> ClassifierPart:
    """Export the checkpoint's classifier and check the graph against PyTorch; with
    `region_check`, fit its intended use's region check."""
    spec = state["model_spec"]
    model = build_classifier(spec["variant"], len(spec["labels"]), spec.get("members", 1))
    model.load_state_dict(state["model"])
    model.eval()
    size = spec["input_size"]
    files = {CLASSIFIER_FILE: scratch / CLASSIFIER_FILE,
             CLASSIFIER_WEIGHTS: scratch / CLASSIFIER_WEIGHTS}
    log.info("build.step", step="export classifier", checkpoint=str(path))
    _export_graph(model, files[CLASSIFIER_FILE], export_classifier, size,
                  float16_weights=float16_weights)
    log.info("build.step", step="compare classifier graph with PyTorch")
    logits_diff, cam_diff = check_parity(
        model, files[CLASSIFIER_FILE], size,
        tolerance=FLOAT16_PARITY_TOLERANCE if float16_weights else PARITY_TOLERANCE)
    log.info("build.classifier_checked", logits_difference=logits_diff,
             cam_difference=cam_diff)
    torch.save(model.state_dict(), files[CLASSIFIER_WEIGHTS])
    provenance = state.get("provenance", {})
    use = intended_use(provenance)
    if use is not None and region_check:
        log.info("build.step", step="fit the region check")
        check = build_region_check(state, scratch / REGION_CHECK_FILE,
                                   float16_weights=float16_weights)
        if check is not None:
            use = replace(use, region_check=replace(
                check, threshold=float(check.threshold),
                validation=jsonable(check.validation)))
            files[REGION_CHECK_FILE] = scratch / REGION_CHECK_FILE
    calibration = state["calibration"]
    where = f"{path} (its calibration)"
    pooled = points(calibration["operating_points"])
    return ClassifierPart(
        entry=ClassifierSpec(
            architecture=spec["architecture"], variant=spec["variant"],
            labels=tuple(spec["labels"]), input_size=size,
            temperature=float(calibration["temperature"]), operating_points=pooled,
            members=spec.get("members", 1),
            operating_points_by_region=(points_by_region(calibration[BY_REGION], pooled, where)
                                        if BY_REGION in calibration else None),
            expected_flag_rates=(flag_rates(calibration["expected_flag_rates"], where)
                                 if "expected_flag_rates" in calibration else None)),
        files=files, training=training_summary(path, state), mean=triple(spec["mean"]),
        std=triple(spec["std"]),
        dataset=Path(provenance["dataset"]) if provenance.get("dataset") else None,
        crop=trained_crop(spec), intended_use=use)


def reused_classifier(bundle: Bundle) -> ClassifierPart:
    """An existing bundle's classifier, unchanged (its files are verified by loading)."""
    manifest = bundle.manifest
    if not manifest.trained:
        raise BuildError(f"{bundle.path}: an untrained bundle has no classifier to reuse")
    if manifest.classifier.fusion is not None:
        source = manifest.training.get("fusion", {}).get("source", "its source")
        raise BuildError(f"{bundle.path}: its probability and operating points are fused "
                         f"with its own detector's box score; take the classifier of "
                         f"{source}, then fuse the new pair with fractured fuse")
    files = {key: bundle.file(key) for key in (CLASSIFIER_FILE, CLASSIFIER_WEIGHTS,
                                               REGION_CHECK_FILE)
             if key in manifest.files}
    training = manifest.training
    dataset = (training.get("classifier") or {}).get("data", {}).get("dataset")
    log.info("build.step", step="take the classifier of another bundle",
             bundle=str(bundle.path), version=manifest.version)
    return ClassifierPart(
        entry=manifest.classifier, files=files,
        training={**training.get("classifier", {}),
                  "from_bundle": f"{manifest.name}-{manifest.version}"},
        mean=manifest.mean, std=manifest.std, dataset=Path(dataset) if dataset else None,
        crop=manifest.crop, intended_use=manifest.intended_use,
        held_out=training.get("held_out"))


@dataclass(frozen=True)
class DetectorPart:
    """A bundle's detector, built from a checkpoint or taken from another bundle."""

    entry: DetectorSpec
    files: dict[str, Path]
    training: dict[str, Any]
    crop: str  # what the detector was trained on (exposed_field.CROPS)
    held_out: dict[str, Any] | None = None  # a reused detector's held-out box scores


def reused_detector(bundle: Bundle, classifier: ClassifierPart) -> DetectorPart:
    """An existing bundle's detector, unchanged, for a classifier trained on the same
    data: the same normalisation and the same data summary (data set, image counts and
    split sizes), so its boxes and held-out scores describe the same images."""
    manifest = bundle.manifest
    if not manifest.trained or manifest.detector is None:
        raise BuildError(f"{bundle.path}: has no trained detector to reuse")
    if manifest.mean != classifier.mean or manifest.std != classifier.std:
        raise BuildError(f"{bundle.path}: its detector normalises images with mean "
                         f"{list(manifest.mean)} / std {list(manifest.std)}, this classifier "
                         f"with {list(classifier.mean)} / {list(classifier.std)}")
    training = manifest.training
    summary = training.get("detector") or {}
    # the split's identity; not the body parts (they follow from it, and records before
    # them lack them) nor how many images the training machine could not decode
    theirs, ours = ({key: value for key, value in (data or {}).items()
                     if key not in ("body_parts", "unreadable")}
                    for data in (summary.get("data"), classifier.training.get("data")))
    if theirs != ours:
        raise BuildError(f"{bundle.path}: its detector was trained on other data or another "
                         f"split ({theirs}) than this classifier ({ours})")
    files = {key: bundle.file(key) for key in (DETECTOR_FILE, DETECTOR_WEIGHTS)
             if key in manifest.files}
    log.info("build.step", step="take the detector of another bundle",
             bundle=str(bundle.path), version=manifest.version)
    return DetectorPart(entry=manifest.detector, files=files,
                        training={**summary,
                                  "from_bundle": f"{manifest.name}-{manifest.version}"},
                        crop=manifest.detector_crop, held_out=training.get("held_out"))


def built_detector(path: Path, state: dict[str, Any], scratch: Path, *,
                   float16_weights: bool) -> DetectorPart:
    """Export the checkpoint's detector and check the graph against PyTorch."""
    spec = state["model_spec"]
    size = spec["input_size"]
    boxer = FractureDetector(spec["backbone"], num_labels=len(spec["labels"]),
                             input_size=size)
    boxer.load_state_dict(state["model"])
    boxer.eval()
    files = {DETECTOR_FILE: scratch / DETECTOR_FILE,
             DETECTOR_WEIGHTS: scratch / DETECTOR_WEIGHTS}
    log.info("build.step", step="export detector (about a minute on 2 cores)")
    _export_graph(boxer, files[DETECTOR_FILE], export_detector, size,
                  float16_weights=float16_weights)
    log.info("build.step", step="compare detector graph with PyTorch")
    parity = check_detector_parity(
        boxer, files[DETECTOR_FILE], size, images=_parity_images(state, size),
        score_tolerance=FLOAT16_PARITY_TOLERANCE if float16_weights else DETECTOR_SCORE_TOLERANCE)
    log.info("build.detector_checked", detections=parity.detections,
             box_difference=parity.box_difference, score_difference=parity.score_difference)
    torch.save(boxer.state_dict(), files[DETECTOR_WEIGHTS])
    return DetectorPart(
        entry=DetectorSpec(architecture=spec["architecture"], backbone=spec["backbone"],
                           labels=tuple(spec["labels"]), input_size=size,
                           detections_per_image=boxer.detections_per_image,
                           operating_points=points(state["calibration"]["operating_points"])),
        files=files, training=training_summary(path, state), crop=trained_crop(spec))


def _export_graph(model: torch.nn.Module, path: Path,
                  export: Callable[[Any, Path, int], None], size: int, *,
                  float16_weights: bool) -> None:
    """Export `model` to `path`; with float16 weights, the model is rounded first (so the
    parity check compares it with the graph it became) and the graph's weights stored so."""
    if float16_weights:
        round_to_float16(model)
    export(model, path, size)
    if float16_weights:
        before, after = store_weights_as_float16(path)
        log.info("build.float16_weights", file=path.name, bytes_before=before,
                 bytes_after=after)


def _parity_images(state: dict[str, Any], size: int) -> list[np.ndarray]:
    """Images a trained detector finds boxes on: the run's validation fractures when its
    data set is still there, plus synthetic ones (a detector may ignore those)."""
    from fractured.training.data import letterbox_samples
    from fractured.training.datasets import DatasetError, open_dataset
    from fractured.training.splits import load_split

    provenance = state.get("provenance", {})
    data = state["settings"]["data"]
    images: list[np.ndarray] = []
    try:
        sample_set = open_dataset(provenance["dataset"], provenance.get("format"),
                                  positive=data.get("positive") or None)
        val = load_split(provenance["split"], sample_set).samples(sample_set, "val")
        chosen = sorted(val, key=lambda sample: -sample.label)[:PARITY_IMAGES]
        images = [image.astype(np.float32) for image in
                  letterbox_samples(chosen, size, crop=trained_crop(state["model_spec"]),
                                    desc="parity images").images]
    except (KeyError, OSError, DatasetError) as exc:
        log.warning("build.parity_data_unavailable", reason=str(exc))
    return images + synthetic_images(size)
