"""The bundles `fractured fuse`, `fractured quantize` and `fractured region-check`
derive from another.

A derived bundle keeps its source's models (fusion: the same files; quantization: INT8
graphs of them) and its manifest, with the classifier entry, backends and training
record changed by what was derived (the classifier entry with `dataclasses.replace`),
and the shared writer writes it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from fractured.engine.bundle import (
    MODEL_CARD_FILE,
    Bundle,
    ClassifierSpec,
    Manifest,
    flag_rates,
    points_by_region,
)
from fractured.engine.region_check import REGION_CHECK_FILE, RegionCheck
from fractured.training.build.records import held_out_summary, joined_held_out, read_notes
from fractured.training.build.writer import new_manifest, points, write
from fractured.training.evaluation.report import jsonable
from fractured.training.export import BuildError
from fractured.training.fusion import FusionResult
from fractured.training.quantize import QuantizationResult, carried_files

if TYPE_CHECKING:
    from fractured.training.region_check import FittingData

log = structlog.get_logger()


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
    pooled = points(result.operating_points)
    classifier = replace(
        source.manifest.classifier, operating_points=pooled, fusion=result.fusion,
        operating_points_by_region=(points_by_region(result.operating_points_by_region,
                                                     pooled, where)
                                    if result.operating_points_by_region else None),
        expected_flag_rates=(flag_rates(result.expected_flag_rates, where)
                             if result.expected_flag_rates else None))
    return _derived(source, out_dir, name=name, version=version, files=files,
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
    return _derived(result.source, out_dir, name=name, version=version, files=files,
                    classifier=result.source.manifest.classifier,
                    backends=("onnxruntime",), tensorrt=None, kind="quantization",
                    summary=result.summary, report=result.report,
                    report_path=result.report_path, notes=notes, record=record)


def _derived(source: Bundle, out_dir: Path, *, name: str | None, version: str,
             files: dict[str, str | Path], classifier: ClassifierSpec,
             backends: tuple[str, ...], tensorrt: Mapping[str, str] | None, kind: str,
             summary: dict[str, Any], report: dict[str, Any], report_path: Path,
             notes: Path | None, record: CardRecord) -> Path:
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
    training["held_out"] = joined_held_out(held_out, boxes)
    record.apply(training)
    if notes is not None:
        training["notes"] = "\n\n".join(filter(None, [training.get("notes"), read_notes(notes)]))
    manifest = new_manifest(name or old.name, version, trained=True, mean=old.mean,
                            std=old.std, classifier=classifier, detector=old.detector,
                            training=jsonable(training), backends=backends, tensorrt=tensorrt,
                            crop=old.crop, detector_crop=old.detector_crop,
                            intended_use=old.intended_use)
    dataset = (training.get("classifier", {}).get("data") or {}).get("dataset")
    write(out_dir, manifest, files, dataset=Path(dataset) if dataset else None)
    log.info("build.done", bundle=str(out_dir), name=manifest.name, version=version,
             made_from=label, by=kind)
    return Path(out_dir)


def build_refitted_region_check(source_dir: Path, out_dir: Path, *, name: str | None,
                                version: str, checkpoint: Path | None = None,
                                split: Path | None = None,
                                float16_weights: bool = False) -> tuple[Path, RegionCheck]:
    """A new bundle of `source_dir`'s files with its intended use's region check fitted
    again (training.region_check.fit_region_check) on the training data of its
    classifier's checkpoint (`checkpoint`, default the one the manifest names): the
    models, calibration, fusion and operating points unchanged, `training.region_check`
    recording the refit, and the figures of the old check on held-out data dropped
    (the new one has none until a bundle of it is scored: quantize or fuse it with a
    report). With `split` instead of a checkpoint (run directories do not outlive their
    machines), the classifier's split folder, checked against the bundle's record of
    its data, and the bundle's own preprocessing say what to fit on.

    BuildError where the source declares no intended use, the checkpoint is not a
    classifier's or was trained at another input size, crop or normalisation, the split
    is not the one the bundle records, or the check cannot be fitted (the log says
    why)."""
    from fractured.training.region_check import fit_region_check

    source = Bundle.load(source_dir)
    old = source.manifest
    label = f"{old.name}-{old.version}"
    if old.intended_use is None:
        raise BuildError(f"{source_dir}: declares no intended use, so has no region check "
                         "to fit")
    if checkpoint and split:
        raise BuildError("give the classifier's checkpoint or its split, not both")
    data, fitted_on = (_fitting_data_of_split(source, split) if split
                       else _fitting_data_of_checkpoint(old, checkpoint))
    with tempfile.TemporaryDirectory(prefix="fractured-region-check-") as scratch:
        graph = Path(scratch) / REGION_CHECK_FILE
        check = fit_region_check(data, graph, float16_weights=float16_weights)
        if check is None:
            raise BuildError(f"the region check could not be fitted on {fitted_on}'s data "
                             "(the log says why)")
        check = replace(check, validation=jsonable(check.validation))
        files: dict[str, str | Path] = {key: source.file(key) for key in old.files
                                        if key not in (MODEL_CARD_FILE, REGION_CHECK_FILE)}
        files[REGION_CHECK_FILE] = graph
        training = dict(old.training)
        training["region_check"] = {"source": label, ("split" if split else "checkpoint"):
                                    str(fitted_on), "threshold": check.threshold,
                                    "method": check.validation["method"]}
        if "held_out" in training:
            training["held_out"] = _without_region_check(training["held_out"])
        manifest = new_manifest(name or old.name, version, trained=old.trained,
                                mean=old.mean, std=old.std, classifier=old.classifier,
                                detector=old.detector, training=jsonable(training),
                                backends=old.backends, tensorrt=old.tensorrt, crop=old.crop,
                                detector_crop=old.detector_crop,
                                intended_use=replace(old.intended_use, region_check=check))
        dataset = (training.get("classifier", {}).get("data") or {}).get("dataset")
        write(out_dir, manifest, files, dataset=Path(dataset) if dataset else None)
    log.info("build.done", bundle=str(out_dir), name=manifest.name, version=version,
             made_from=label, by="region_check")
    return Path(out_dir), check


def _fitting_data_of_checkpoint(old: Manifest, checkpoint: Path | None,
                                ) -> tuple[FittingData, Path]:
    """The fitting data a classifier checkpoint records (default: the one `old` names),
    refused where its classifier saw other inputs than `old`'s."""
    from fractured.training import checkpoint as checkpoints
    from fractured.training.region_check import FittingData

    path = checkpoint or Path(str((old.training.get("classifier") or {}).get("checkpoint")))
    try:
        state = checkpoints.load(path, "classifier")
        data = FittingData.of_checkpoint(state)
    except checkpoints.CheckpointError as exc:
        raise BuildError(f"{exc} (its run directory gone? give the classifier's split "
                         "folder instead)") from None
    except KeyError as exc:
        raise BuildError(f"{path}: records no {exc}, so no data to fit on") from None
    seen = (data.input_size, data.crop, data.mean, data.std)
    wanted = (old.classifier.input_size, old.crop, tuple(old.mean), tuple(old.std))
    if seen != wanted:
        raise BuildError(f"{path}: its classifier saw input size, crop, mean and std "
                         f"{seen}; {old.name}-{old.version}'s sees {wanted}")
    return data, path


def _fitting_data_of_split(source: Bundle, split: Path) -> tuple[FittingData, Path]:
    """The fitting data of `source`'s classifier from its split folder and the bundle's
    own record, refused where the split is not the one the classifier was trained on
    (bundle_scoring.open_split's check of its parts, and its csv_sha256 where the
    bundle records one)."""
    from fractured.training.bundle_scoring import open_split
    from fractured.training.datasets import DatasetError
    from fractured.training.region_check import FittingData
    from fractured.training.splits import read_written

    old = source.manifest
    recorded = ((old.training.get("classifier") or {}).get("data") or {}).get(
        "split_csv_sha256")
    try:
        parts = open_split(source, split, None)
        sha = read_written(split)[0]["csv_sha256"]
    except (DatasetError, OSError) as exc:
        raise BuildError(str(exc)) from None
    if recorded not in (None, sha):
        raise BuildError(f"{split}: not the split {old.name}-{old.version}'s classifier was "
                         "trained on (csv_sha256 differs)")
    return FittingData(str(parts.dataset), parts.format, None, split,
                       old.classifier.input_size, old.crop, tuple(old.mean),
                       tuple(old.std)), split


def _without_region_check(held_out: Mapping[str, Any]) -> dict[str, Any]:
    """A held-out record less what the old region check scored (the node view's)."""
    node = held_out.get("node")
    if not isinstance(node, Mapping):
        return dict(held_out)
    return {**held_out, "node": {part: ({key: value for key, value in view.items()
                                         if key != "region_check"}
                                        if isinstance(view, Mapping) else view)
                                 for part, view in node.items()}}
