"""Build engine bundles: export the models (training.export), write the bundle.

A bundle holds the ONNX graphs, the torch weights they came from, a manifest that says
what they are and a model card; `engine.bundle.write_bundle` makes it immutable and
checksummed. A trained bundle comes from `fractured train` checkpoints (best.pt, with
the calibration fitted on validation); an untrained one from random weights, for tests
and first installs.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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
    FRACTURE_LABEL,
    MODEL_CARD_FILE,
    SCHEMA_VERSION,
    Bundle,
    ClassifierSpec,
    DetectorSpec,
    Manifest,
    Preprocessing,
    flag_rates,
    points_by_region,
    write_bundle,
)
from fractured.engine.exposed_field import NO_CROP
from fractured.engine.findings import OperatingPoints
from fractured.engine.intended_use import IntendedUse
from fractured.engine.models import (
    INPUT_SIZES,
    FractureClassifier,
    FractureDetector,
    build_classifier,
)
from fractured.engine.region_check import REGION_CHECK_FILE
from fractured.training import checkpoint
from fractured.training.data import trained_crop
from fractured.training.evaluation.report import jsonable
from fractured.training.export import (
    DETECTOR_SCORE_TOLERANCE,
    FLOAT16_PARITY_TOLERANCE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PARITY_TOLERANCE,
    BuildError,
    build_untrained_detector,
    calibrate_batchnorm,
    check_detector_parity,
    check_parity,
    export_classifier,
    export_detector,
    round_to_float16,
    store_weights_as_float16,
    synthetic_images,
)
from fractured.training.fusion import FusionResult
from fractured.training.intended_use import intended_use
from fractured.training.model_card import dataset_credits, model_card
from fractured.training.quantize import QuantizationResult, carried_files
from fractured.training.region_check import build_region_check
from fractured.training.tensorrt import add_plans

log = structlog.get_logger()
#: Validation images (fractures first) the detector's ONNX graph is compared on.
PARITY_IMAGES = 4


def build_untrained_bundle(out_dir: Path, *, name: str = "fractured-untrained",
                           version: str = "0.0.0", variant: str = "b0",
                           input_size: int | None = None, detector: str | None = None,
                           detector_input_size: int = 512, seed: int = 0,
                           tensorrt: bool | None = False) -> Path:
    """Build a bundle with random weights, for wiring and tests before a model is trained.

    `input_size` defaults to the variant's native size (224 for b0); `detector` names a
    Faster R-CNN backbone (see DETECTOR_BACKBONES) to include one. The bundle holds the
    ONNX graphs and the torch weights they came from (for the torch backend). The
    manifest says trained=false, which every result made with it shows as "UNTRAINED
    MODEL"; its operating points are placeholders, chosen on no data. `tensorrt` as in
    `build_bundle` (default False: plans only when asked for).
    """
    size = INPUT_SIZES[variant] if input_size is None else input_size
    if size < 32:
        raise ValueError(f"input_size must be at least 32 (the backbone's stride), got {size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FractureClassifier(variant=variant, num_labels=1)
        calibrate_batchnorm(model, size)
    with tempfile.TemporaryDirectory(prefix="fractured-build-") as scratch:
        files = {CLASSIFIER_FILE: Path(scratch) / CLASSIFIER_FILE,
                 CLASSIFIER_WEIGHTS: Path(scratch) / CLASSIFIER_WEIGHTS}
        export_classifier(model, files[CLASSIFIER_FILE], size)
        check_parity(model, files[CLASSIFIER_FILE], size)
        torch.save(model.state_dict(), files[CLASSIFIER_WEIGHTS])
        detector_spec = None
        if detector is not None:
            boxer = build_untrained_detector(backbone=detector, input_size=detector_input_size,
                                             seed=seed)
            files[DETECTOR_FILE] = Path(scratch) / DETECTOR_FILE
            files[DETECTOR_WEIGHTS] = Path(scratch) / DETECTOR_WEIGHTS
            export_detector(boxer, files[DETECTOR_FILE], detector_input_size)
            check_detector_parity(boxer, files[DETECTOR_FILE], detector_input_size)
            torch.save(boxer.state_dict(), files[DETECTOR_WEIGHTS])
            detector_spec = DetectorSpec(
                architecture=boxer.architecture, backbone=detector, labels=(FRACTURE_LABEL,),
                input_size=detector_input_size,
                detections_per_image=boxer.detections_per_image,
                operating_points=OperatingPoints(0.5, 0.8))
        manifest = _manifest(
            name, version, trained=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            classifier=ClassifierSpec(
                architecture=model.architecture, variant=variant, labels=(FRACTURE_LABEL,),
                input_size=size, temperature=1.0,
                operating_points=OperatingPoints(0.4, 0.6)),
            detector=detector_spec,
            training={"note": "random weights, never trained", "seed": seed})
        manifest = add_plans(manifest, files, Path(scratch), required=tensorrt)
        _write(out_dir, manifest, files, dataset=None)
    return Path(out_dir)


def build_bundle(checkpoints: Sequence[Path], out_dir: Path, *, name: str,
                 version: str, evaluation: Path | None = None,
                 notes: Path | None = None, float16_weights: bool = False,
                 classifier_bundle: Path | None = None,
                 detector_bundle: Path | None = None,
                 tensorrt: bool | None = None, region_check: bool = True) -> Path:
    """Build a bundle from trained checkpoints: a classifier best.pt (required) and a
    detector best.pt (optional), or a run directory holding them.

    Each graph is exported and compared with its PyTorch model before anything is
    written (BuildError past tolerance). The manifest carries the temperature and
    operating points fitted on validation and a summary of the data and metrics; the
    model card is written from that manifest. `evaluation` (a `fractured evaluate`
    metrics.json, or its folder) adds the held-out scores of these very checkpoints;
    `notes` (Markdown) adds what was tried on the way and its effect.
    `float16_weights` rounds the weights to float16 and stores the ONNX graphs' weights
    so (half the size, float32 arithmetic; `export.store_weights_as_float16`), and
    leaves the torch weights out: the bundle runs on ONNX Runtime (and TensorRT plans
    built from its graphs), small enough to ship in a repository.
    `classifier_bundle` takes the classifier of an existing bundle as it is (its files,
    calibration, training record and held-out scores, byte for byte) instead of a
    classifier checkpoint: a new detector beside a classifier already in service.
    `detector_bundle` does the same for the detector: a new classifier beside a detector
    already in service (the detector must have been trained on the same data summary,
    split sizes included, and with the same normalisation).
    `tensorrt`: None builds FP16 TensorRT plans where TensorRT and a GPU are present
    (each checked against ONNX Runtime, `training.tensorrt.add_plans`), True requires
    them, False leaves them out.
    `region_check` fits the intended use's region check (training.region_check) on the
    classifier checkpoint's data, where it declares an intended use; a reused classifier
    brings its own.
    Refused: a checkpoint that is not a finished run (no calibration), a smoke run on a
    `[data].limit` subset, two checkpoints of one kind, an evaluation of other
    checkpoints.
    """
    states = _trained_states(checkpoints, classifier_required=classifier_bundle is None)
    if classifier_bundle is not None and "classifier" in states:
        raise BuildError("give a classifier checkpoint or --classifier-bundle, not both")
    if detector_bundle is not None and "detector" in states:
        raise BuildError("give a detector checkpoint or --detector-bundle, not both")
    held_out = (_held_out_summary(evaluation, {kind: path for kind, (path, _) in states.items()})
                if evaluation is not None else None)
    notes_text = _notes(notes) if notes is not None else None
    with tempfile.TemporaryDirectory(prefix="fractured-build-") as scratch:
        part = (_reused_classifier(Bundle.load(classifier_bundle))
                if classifier_bundle is not None else
                _built_classifier(*states["classifier"], Path(scratch),
                                  float16_weights=float16_weights,
                                  region_check=region_check))
        files = dict(part.files)
        training: dict[str, Any] = {"classifier": part.training}
        detector_spec = None
        detector_crop = part.crop  # the detector's own crop, where it has one
        if "detector" in states:
            det_path, det_state = states["detector"]
            detector_crop = trained_crop(det_state["model_spec"])
            detector_spec = _export_detector(det_state, Path(scratch), files,
                                            float16_weights=float16_weights)
            training["detector"] = _training_summary(det_path, det_state)
        if part.held_out is not None:  # the reused classifier's, with this build's boxes
            held_out = _joined_held_out(part.held_out, held_out)
        if detector_bundle is not None:  # this build's classification, the reused boxes
            boxes_from = Bundle.load(detector_bundle)
            detector_crop = boxes_from.manifest.detector_crop
            reused = _reused_detector(boxes_from, part)
            files |= reused.files
            detector_spec = reused.entry
            training["detector"] = reused.training
            held_out = _joined_held_out(held_out, reused.held_out) or None
        if held_out is not None:
            training["held_out"] = held_out
        if notes_text is not None:
            training["notes"] = notes_text
        # torch needs both models' weights; a reused float16 bundle's part has none
        onnx_only = (float16_weights or CLASSIFIER_WEIGHTS not in files
                     or (detector_spec is not None and DETECTOR_WEIGHTS not in files))
        if float16_weights:  # an ONNX-only bundle: the torch weights stay behind
            training["weights"] = ("rounded to float16 and stored so in the ONNX graphs "
                                   "(float32 arithmetic); no torch weights")
        if onnx_only:
            files = {key: path for key, path in files.items()
                     if key not in (CLASSIFIER_WEIGHTS, DETECTOR_WEIGHTS)}
        manifest = _manifest(
            name, version, trained=True, mean=part.mean, std=part.std,
            classifier=part.entry, detector=detector_spec, training=jsonable(training),
            backends=("onnxruntime",) if onnx_only else ("onnxruntime", "torch"),
            crop=part.crop, detector_crop=detector_crop, intended_use=part.intended_use)
        manifest = add_plans(manifest, files, Path(scratch), required=tensorrt)
        log.info("build.step", step="write manifest, model card and checksums")
        _write(out_dir, manifest, files, dataset=part.dataset)
    log.info("build.done", bundle=str(out_dir), name=name, version=version,
             detector=detector_spec is not None, classifier_from=str(classifier_bundle or ""),
             detector_from=str(detector_bundle or ""))
    return Path(out_dir)


@dataclass(frozen=True)
class CardRecord:
    """What a derived bundle's card cites beside its own scoring: a `fractured
    check-dicom` result (dicom-check.json) and how many scorings the split's test part
    had before this one (the test ledger's count)."""

    dicom_check: Mapping[str, Any] | None = None
    test_looks: int | None = None

    @classmethod
    def read(cls, dicom_check: Path | None, test_looks: int | None,
             source: Path) -> CardRecord:
        """BuildError where `dicom_check` is not a check-dicom result, or one of a bundle
        other than `source` or the one `source` was made from (before any scoring)."""
        check = None
        if dicom_check is not None:
            try:
                check = json.loads(dicom_check.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise BuildError(f"{dicom_check}: not readable as JSON ({exc})") from None
            if not isinstance(check, dict) or not {"bundle", "variants",
                                                   "passed"} <= set(check):
                raise BuildError(f"{dicom_check}: not a `fractured check-dicom` result "
                                 "(it needs bundle, variants and passed)")
            manifest = Bundle.load(source).manifest
            allowed = {f"{manifest.name}-{manifest.version}",
                       (manifest.training.get("classifier") or {}).get("from_bundle")}
            if check["bundle"] not in allowed:
                raise BuildError(f"{dicom_check}: a DICOM check of {check['bundle']}, not "
                                 f"of {' or '.join(sorted(filter(None, allowed)))}")
        return cls(check, test_looks)

    def apply(self, training: dict[str, Any]) -> None:
        """Add the record to a derived bundle's `training`."""
        if self.dicom_check is not None:
            training["dicom_check"] = dict(self.dicom_check)
        if self.test_looks is not None:
            training["held_out"] = {**training["held_out"],
                                    "test_looks_before": self.test_looks}


def build_fused_bundle(result: FusionResult, out_dir: Path, *, name: str | None = None,
                       version: str, notes: Path | None = None,
                       record: CardRecord = CardRecord()) -> Path:
    """A new bundle of `result.source`'s model files whose classifier probability is fused
    with the detector's best box score (`fusion.fuse` fitted it): the manifest gains
    `classifier.fusion` and the operating points chosen on the fused probability, per
    region too where fuse fitted them (the source's, on the unfused scale, never carry
    over); the held-out scores are the fused ones beside the source's box scores; the
    model card says the probability is fused and what that changed. `notes` (Markdown)
    are added to the source's, and `record` to its training record."""
    source = result.source
    files: dict[str, str | Path] = {key: source.file(key) for key in source.manifest.files
                                    if key != MODEL_CARD_FILE}
    where = f"{result.report_path} (the fusion's points)"
    points = _points(result.operating_points)
    classifier = replace(
        source.manifest.classifier, operating_points=points, fusion=result.fusion,
        operating_points_by_region=(points_by_region(result.operating_points_by_region,
                                                     points, where)
                                    if result.operating_points_by_region else None),
        expected_flag_rates=(flag_rates(result.expected_flag_rates, where)
                             if result.expected_flag_rates else None))
    return _derived_bundle(source, out_dir, name=name, version=version, files=files,
                           classifier=classifier, backends=source.manifest.backends,
                           tensorrt=source.manifest.tensorrt, kind="fusion",
                           summary=result.summary, report=result.report,
                           report_path=result.report_path, notes=notes, record=record)


def build_quantized_bundle(result: QuantizationResult, out_dir: Path, *,
                           name: str | None = None, version: str,
                           notes: Path | None = None,
                           record: CardRecord = CardRecord()) -> Path:
    """A new bundle of `result.source` with its graphs in INT8 (`quantize.quantize` made
    and checked them): the same calibration, fusion and operating points (per region
    too, where the source has them: INT8 must not move the probability, which the
    check measures, so the thresholds fitted on it still hold); ONNX only (the
    torch weights are the float32 model's, another model); the held-out classification
    scores are the INT8 bundle's, the box scores the source's, marked as such."""
    files: dict[str, str | Path] = {**carried_files(result.source), **result.files}
    return _derived_bundle(result.source, out_dir, name=name, version=version, files=files,
                           classifier=result.source.manifest.classifier,
                           backends=("onnxruntime",), tensorrt=None, kind="quantization",
                           summary=result.summary, report=result.report,
                           report_path=result.report_path, notes=notes, record=record)


def _derived_bundle(source: Bundle, out_dir: Path, *, name: str | None, version: str,
                    files: dict[str, str | Path], classifier: ClassifierSpec,
                    backends: tuple[str, ...], tensorrt: Mapping[str, str] | None,
                    kind: str, summary: dict[str, Any], report: dict[str, Any],
                    report_path: Path, notes: Path | None, record: CardRecord) -> Path:
    """A bundle made from another by `kind` (fusion, quantization): its manifest with
    `classifier`, `backends` and `tensorrt` replaced, `training[kind]` = `summary`, the
    held-out record from `report` (the source's box scores kept) and `record`, a new
    model card."""
    old = source.manifest
    label = f"{old.name}-{old.version}"
    training = dict(old.training)
    for part in ("classifier", "detector"):
        if part in training:
            training[part] = {**training[part], "from_bundle": label}
    training[kind] = summary
    held_out = held_out_summary(report, report_path)
    # box scores: this report's where it measured the detector (quantization), else the
    # source's (fusion leaves the detector as it was)
    boxes = held_out if "detection" in held_out else training.get("held_out")
    training["held_out"] = _joined_held_out(held_out, boxes)
    record.apply(training)
    if notes is not None:
        training["notes"] = "\n\n".join(filter(None, [training.get("notes"), _notes(notes)]))
    manifest = replace(_manifest(name or old.name, version, trained=True, mean=old.mean,
                                 std=old.std, classifier=classifier, detector=old.detector,
                                 training=jsonable(training), backends=backends,
                                 crop=old.crop, detector_crop=old.detector_crop,
                                 intended_use=old.intended_use),
                       tensorrt=tensorrt)
    dataset = (training.get("classifier", {}).get("data") or {}).get("dataset")
    _write(out_dir, manifest, files, dataset=Path(dataset) if dataset else None)
    log.info("build.done", bundle=str(out_dir), name=manifest.name, version=version,
             made_from=label, by=kind)
    return Path(out_dir)


def _write(out_dir: Path, manifest: Manifest, files: Mapping[str, str | Path], *,
           dataset: Path | None) -> None:
    """The one writer of every build: the model card from `manifest` (with the credits
    of the data set at `dataset`), then the bundle (engine.bundle.write_bundle)."""
    with tempfile.TemporaryDirectory(prefix="fractured-card-") as scratch:
        card = Path(scratch) / MODEL_CARD_FILE
        card.write_text(model_card(manifest.to_dict(), dataset_credits(dataset)),
                        encoding="utf-8")
        write_bundle(out_dir, manifest, {**files, MODEL_CARD_FILE: card})


@dataclass(frozen=True)
class _ClassifierPart:
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


def _built_classifier(path: Path, state: dict[str, Any], scratch: Path, *,
                      float16_weights: bool, region_check: bool = False) -> _ClassifierPart:
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
    points = _points(calibration["operating_points"])
    return _ClassifierPart(
        entry=ClassifierSpec(
            architecture=spec["architecture"], variant=spec["variant"],
            labels=tuple(spec["labels"]), input_size=size,
            temperature=float(calibration["temperature"]), operating_points=points,
            members=spec.get("members", 1),
            operating_points_by_region=(points_by_region(calibration[BY_REGION], points, where)
                                        if BY_REGION in calibration else None),
            expected_flag_rates=(flag_rates(calibration["expected_flag_rates"], where)
                                 if "expected_flag_rates" in calibration else None)),
        files=files, training=_training_summary(path, state), mean=_triple(spec["mean"]),
        std=_triple(spec["std"]),
        dataset=Path(provenance["dataset"]) if provenance.get("dataset") else None,
        crop=trained_crop(spec), intended_use=use)


def _reused_classifier(bundle: Bundle) -> _ClassifierPart:
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
    return _ClassifierPart(
        entry=manifest.classifier, files=files,
        training={**training.get("classifier", {}),
                  "from_bundle": f"{manifest.name}-{manifest.version}"},
        mean=manifest.mean, std=manifest.std, dataset=Path(dataset) if dataset else None,
        crop=manifest.crop, intended_use=manifest.intended_use,
        held_out=training.get("held_out"))


_BOX_SCORES = ("detection", "detection_report")  # a held-out summary's detector part


def _joined_held_out(classification: dict[str, Any] | None,
                     boxes: dict[str, Any] | None) -> dict[str, Any]:
    """One held-out summary from the classifier part of one and the box part of another
    (a bundle that takes one of its models from another bundle)."""
    return ({key: value for key, value in (classification or {}).items()
             if key not in _BOX_SCORES}
            | {key: value for key, value in (boxes or {}).items() if key in _BOX_SCORES})


@dataclass(frozen=True)
class _DetectorPart:
    """Another bundle's detector, taken as it is."""

    entry: DetectorSpec
    files: dict[str, Path]
    training: dict[str, Any]
    held_out: dict[str, Any] | None  # its held-out box scores, among the bundle's


def _reused_detector(bundle: Bundle, classifier: _ClassifierPart) -> _DetectorPart:
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
    return _DetectorPart(entry=manifest.detector, files=files,
                         training={**summary,
                                   "from_bundle": f"{manifest.name}-{manifest.version}"},
                         held_out=training.get("held_out"))


def _manifest(name: str, version: str, *, trained: bool, mean: Sequence[float],
              std: Sequence[float], classifier: ClassifierSpec,
              detector: DetectorSpec | None, training: Mapping[str, Any],
              backends: tuple[str, ...] = ("onnxruntime", "torch"),
              crop: str = NO_CROP, detector_crop: str | None = None,
              intended_use: IntendedUse | None = None) -> Manifest:
    """A new manifest, created now, without files (write_bundle adds their checksums);
    the ONNX graphs are always in the bundle, the torch weights where `backends` has
    torch. The crops are recorded as `Preprocessing.of` says."""
    return Manifest(schema_version=SCHEMA_VERSION, name=name, version=version,
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    trained=trained, mean=_triple(mean), std=_triple(std),
                    classifier=classifier, detector=detector, files={}, backends=backends,
                    training=training, preprocessing=Preprocessing.of(crop, detector_crop),
                    intended_use=intended_use)


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    first, second, third = values
    return (float(first), float(second), float(third))


def _points(data: Mapping[str, float]) -> OperatingPoints:
    """Operating points from their plain form (a calibration's record)."""
    return OperatingPoints(float(data["high_sensitivity"]), float(data["high_specificity"]))


def _trained_states(paths: Sequence[Path], *, classifier_required: bool = True,
                    ) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{kind: (path, checkpoint)} from best.pt files and run directories."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = [path / kind / checkpoint.BEST for kind in ("classifier", "detector")
                     if (path / kind / checkpoint.BEST).is_file()]
            if not found:
                raise BuildError(f"{path}: no classifier/{checkpoint.BEST} or "
                                 f"detector/{checkpoint.BEST} in this run directory")
            files += found
        else:
            files.append(path)
    states: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in files:
        state = checkpoint.load(path)
        kind = state.get("kind")
        if kind not in ("classifier", "detector"):
            raise BuildError(f"{path}: a checkpoint of unknown kind {kind!r}")
        if kind in states:
            raise BuildError(f"{path}: a second {kind} checkpoint (the first is "
                             f"{states[kind][0]}); a bundle holds one of each")
        if "calibration" not in state:
            raise BuildError(f"{path}: no calibration, so the run did not finish (or this "
                             f"is last.pt); resume the run, then build from its {checkpoint.BEST}")
        if state.get("limited"):
            raise BuildError(f"{path}: trained on a [data].limit subset (a smoke run), not a "
                             "model to deploy")
        states[kind] = (path, state)
    if classifier_required and "classifier" not in states:
        raise BuildError("a bundle needs a classifier checkpoint (classifier/best.pt), or "
                         "--classifier-bundle to take another bundle's")
    return states


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


def _export_detector(state: dict[str, Any], scratch: Path, files: dict[str, Path], *,
                     float16_weights: bool) -> DetectorSpec:
    """Export and check the detector; its manifest entry."""
    spec = state["model_spec"]
    size = spec["input_size"]
    boxer = FractureDetector(spec["backbone"], num_labels=len(spec["labels"]),
                             input_size=size)
    boxer.load_state_dict(state["model"])
    boxer.eval()
    files[DETECTOR_FILE] = scratch / DETECTOR_FILE
    files[DETECTOR_WEIGHTS] = scratch / DETECTOR_WEIGHTS
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
    return DetectorSpec(architecture=spec["architecture"], backbone=spec["backbone"],
                        labels=tuple(spec["labels"]), input_size=size,
                        detections_per_image=boxer.detections_per_image,
                        operating_points=_points(state["calibration"]["operating_points"]))


def _held_out_summary(path: Path, checkpoints: dict[str, Path]) -> dict[str, Any]:
    """`held_out_summary` of a `fractured evaluate` report of these very checkpoints."""
    path = Path(path)
    metrics_file = path / "metrics.json" if path.is_dir() else path
    try:
        report = json.loads(metrics_file.read_text(encoding="utf-8"))
        model = report["model"]
        for kind, checkpoint_path in checkpoints.items():
            evaluated = (model.get(kind) or {}).get("checkpoint")
            if evaluated is None or Path(evaluated).resolve() != checkpoint_path.resolve():
                raise BuildError(f"{metrics_file}: evaluates {kind} {evaluated}, not "
                                 f"{checkpoint_path}; run fractured evaluate on this run first")
        return held_out_summary(report, metrics_file)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BuildError(f"{metrics_file}: not a fractured evaluate metrics.json "
                         f"({exc})") from exc


def held_out_summary(report: dict[str, Any], source: Path) -> dict[str, Any]:
    """What the manifest keeps of an evaluation report (`fractured evaluate`'s, or the
    one `fractured fuse` writes) read from `source`: the split, the image-level scores
    with their confidence intervals, the operating points as reached there, the
    calibration error, every subset, the detector's AP and FROC, and what the node
    shows per body region where the report assessed it (fuse, quantize)."""
    data = report["data"]
    scores = report.get("classification") or {}  # absent for a detector-only run

    def image_level(part: dict[str, Any]) -> dict[str, Any]:
        return {key: part.get(key) for key in (
            "n", "positives", "roc_auc", "roc_auc_ci95", "average_precision", "note")}

    summary: dict[str, Any] = {
        "report": str(source), "created": report.get("created"),
        "split": data.get("split"), "images": data.get("images"),
        "fracture": data.get("fracture"), "unreadable": len(data.get("unreadable") or ()),
        "classification": image_level(scores),
        "operating_points": {
            name: {key: point.get(key) for key in ("threshold", "sensitivity", "specificity")}
            for name, point in (report.get("operating_points") or {}).items()
            if isinstance(point, dict)},
        "ece_after": (report.get("calibration") or {}).get("ece_after"),
        "subsets": {name: image_level(part)
                    for name, part in (report.get("subsets") or {}).items()},
    }
    if report.get("node"):
        summary["node"] = report["node"]
    detection = report.get("detection")
    if detection:
        summary["detection_report"] = str(source)
        summary["detection"] = {key: detection.get(key) for key in (
            "images", "gt_boxes", "ap50", "ap50_95", "froc_score", "lesion_sensitivity",
            "at_threshold", "note")}
    return summary


def _notes(path: Path) -> str:
    """The development notes' Markdown (what was tried, its effect), for the card."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise BuildError(f"{path}: cannot read the notes ({exc})") from exc
    if not text:
        raise BuildError(f"{path}: the notes file is empty")
    return text


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


def _training_summary(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """What the manifest and model card say about a model's training."""
    kind = state["kind"]
    provenance = state.get("provenance", {})
    settings = state["settings"][kind]
    members = {"ensemble": state["ensemble"]} if "ensemble" in state else {}
    return members | {
        "checkpoint": str(path),
        "epoch": state["epoch"],
        "best_metric": settings["best_metric"],
        "initial_weights": settings["initial_weights"],
        **({"pretrained": provenance["pretrained"]} if provenance.get("pretrained") else {}),
        "validation": state.get("metrics", {}),
        "achieved_on_val": state["calibration"].get("achieved_on_val", {}),
        # the shift is already in the weights; recorded so a reader knows it was applied
        "logit_shift": state["calibration"].get("logit_shift", 0.0),
        "data": {key: provenance.get(key) for key in (
            "dataset", "format", "images", "train_images", "train_positive",
            "val_images", "val_positive", "body_parts")}
        | {"unreadable": len(provenance.get("unreadable", ()))},
        "settings": settings,
    }
