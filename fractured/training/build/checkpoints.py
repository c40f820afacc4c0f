"""`fractured build-engine`: a bundle from `fractured train` checkpoints.

A classifier (required) and a detector (optional), each from a checkpoint (best.pt,
with the calibration fitted on validation) or taken as it is from an existing bundle
(build.parts); the held-out scores and notes go into the training record
(build.records), TensorRT plans where asked for, and the shared writer writes the
bundle.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from fractured.engine.bundle import CLASSIFIER_WEIGHTS, DETECTOR_WEIGHTS, Bundle
from fractured.training import checkpoint
from fractured.training.build.parts import (
    built_classifier,
    built_detector,
    reused_classifier,
    reused_detector,
)
from fractured.training.build.records import evaluation_summary, joined_held_out, read_notes
from fractured.training.build.writer import new_manifest, write
from fractured.training.evaluation.report import jsonable
from fractured.training.export import BuildError
from fractured.training.tensorrt import add_plans

log = structlog.get_logger()


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
    held_out = (evaluation_summary(evaluation, {kind: path for kind, (path, _) in states.items()})
                if evaluation is not None else None)
    notes_text = read_notes(notes) if notes is not None else None
    with tempfile.TemporaryDirectory(prefix="fractured-build-") as scratch:
        classifier = (reused_classifier(Bundle.load(classifier_bundle))
                      if classifier_bundle is not None else
                      built_classifier(*states["classifier"], Path(scratch),
                                       float16_weights=float16_weights,
                                       region_check=region_check))
        detector = (built_detector(*states["detector"], Path(scratch),
                                   float16_weights=float16_weights)
                    if "detector" in states else
                    reused_detector(Bundle.load(detector_bundle), classifier)
                    if detector_bundle is not None else None)
        files = classifier.files | (detector.files if detector is not None else {})
        training: dict[str, Any] = {"classifier": classifier.training}
        if detector is not None:
            training["detector"] = detector.training
        if classifier.held_out is not None:  # the reused classifier's, with this build's boxes
            held_out = joined_held_out(classifier.held_out, held_out)
        if detector is not None and detector_bundle is not None:  # the reused boxes
            held_out = joined_held_out(held_out, detector.held_out) or None
        if held_out is not None:
            training["held_out"] = held_out
        if notes_text is not None:
            training["notes"] = notes_text
        # torch needs both models' weights; a reused float16 bundle's part has none
        onnx_only = (float16_weights or CLASSIFIER_WEIGHTS not in files
                     or (detector is not None and DETECTOR_WEIGHTS not in files))
        if float16_weights:  # an ONNX-only bundle: the torch weights stay behind
            training["weights"] = ("rounded to float16 and stored so in the ONNX graphs "
                                   "(float32 arithmetic); no torch weights")
        if onnx_only:
            files = {key: path for key, path in files.items()
                     if key not in (CLASSIFIER_WEIGHTS, DETECTOR_WEIGHTS)}
        manifest = new_manifest(
            name, version, trained=True, mean=classifier.mean, std=classifier.std,
            classifier=classifier.entry, detector=detector.entry if detector else None,
            training=jsonable(training),
            backends=("onnxruntime",) if onnx_only else ("onnxruntime", "torch"),
            crop=classifier.crop, detector_crop=detector.crop if detector else None,
            intended_use=classifier.intended_use)
        manifest = add_plans(manifest, files, Path(scratch), required=tensorrt)
        log.info("build.step", step="write manifest, model card and checksums")
        write(out_dir, manifest, files, dataset=classifier.dataset)
    log.info("build.done", bundle=str(out_dir), name=name, version=version,
             detector=detector is not None, classifier_from=str(classifier_bundle or ""),
             detector_from=str(detector_bundle or ""))
    return Path(out_dir)


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
