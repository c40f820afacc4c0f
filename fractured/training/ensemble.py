"""`fractured ensemble`: finished classifier runs of one recipe averaged into one model.

Networks trained from different random starts make partly different mistakes, so the
mean of their logits ranks images better than either alone; their weights cannot be
averaged instead (each run ends in its own minimum). The members' logits and CAMs are
averaged inside one network (engine.models.ClassifierEnsemble), so the bundle keeps
one graph, the heatmap is still what the score was made of, and every backend runs it.

A member is a finished run (its directory or classifier/best.pt), or a bundle whose
classifier is a ResNet: a float16 bundle keeps no torch weights, and a ResNet's are
read back from its graph (training.weights.read_onnx_resnet), so a model already in
service can join a newer seed. Every member must be the same variant, input size,
labels and normalisation, trained on the same split: the runs' split files must be
identical, and a bundle's recorded data counts must match theirs. Each member's own
calibration shift is already in its head; the ensemble is calibrated again, on the
validation split the members share, as a finished training run is.

The result is a run directory (train.toml and split/ of the first run, and
classifier/best.pt, optionally with a detector of the same split beside it) that
`fractured evaluate` and `fractured build-engine` take like any other.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.utils.data import DataLoader

from fractured.config import ConfigError
from fractured.engine.bundle import CLASSIFIER_FILE, MANIFEST_FILE, Bundle, BundleError
from fractured.engine.models import ClassifierEnsemble, FractureClassifier
from fractured.training import checkpoint
from fractured.training import config as train_config
from fractured.training.classifier import calibrate
from fractured.training.data import (
    ClassifierImages,
    crop_entry,
    letterbox_samples,
    trained_crop,
)
from fractured.training.datasets import DatasetError, open_dataset
from fractured.training.loops import Device, classifier_logits
from fractured.training.run import SETTINGS_FILE, SPLIT_DIR
from fractured.training.splits import JSON_NAME, load_split
from fractured.training.weights import read_onnx_resnet

log = structlog.get_logger()

#: What a member must share with the others (a checkpoint's model_spec keys).
_SAME_MODEL = ("variant", "input_size", "labels", "mean", "std")
#: A bundle member's recorded training data, compared with the runs' (its split files
#: are not in the bundle).
_SAME_DATA = ("format", "images", "train_images", "train_positive", "val_images",
              "val_positive")
_BATCH = 16


class EnsembleError(Exception):
    """Members that cannot be averaged, or an output that cannot be written; the message
    names the member and why."""


@dataclass(frozen=True)
class Member:
    """One network of the ensemble and where it came from."""

    source: Path
    spec: dict[str, Any]  # model_spec keys: variant, input_size, labels, mean, std, crop
    weights: dict[str, torch.Tensor]
    record: dict[str, Any]  # what the ensemble's checkpoint says about it
    run: Path | None = None  # a run's directory (None for a bundle)
    state: dict[str, Any] | None = None  # a run's checkpoint


def build_ensemble(sources: Sequence[Path], out_dir: Path, *, detector: Path | None = None,
                   device: str = "auto") -> Path:
    """Average the classifiers at `sources` into `out_dir`/classifier/best.pt, calibrated
    on their shared validation split; returns its path. `detector` (a run directory or
    detector/best.pt trained on the same split) is copied beside it."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise EnsembleError(f"{out_dir}: already exists; choose a new directory")
    members = [_member(Path(source)) for source in sources]
    if len(members) < 2:
        raise EnsembleError("an ensemble needs at least two members")
    runs = [member for member in members if member.state is not None]
    if not runs:
        raise EnsembleError("at least one member must be a training run: it gives the "
                            "split and the data the ensemble is calibrated on")
    reference = runs[0]
    assert reference.state is not None and reference.run is not None
    _check_compatible(members, reference)
    detector_state = _detector(detector, reference) if detector is not None else None

    settings = train_config.from_dict(reference.state["settings"], base=Path.cwd())
    model = ClassifierEnsemble(reference.spec["variant"], len(reference.spec["labels"]),
                               len(members))
    for network, member in zip(model.members, members, strict=True):
        network.load_state_dict(member.weights)
    provenance = reference.state.get("provenance", {})
    val_set = _validation_images(reference, settings)
    runner = Device.choose(device, amp=False, channels_last=False)
    member_logits = []
    for network, member in zip(model.members, members, strict=True):
        logits, labels = _logits(network, val_set, runner)
        member_logits.append(logits)
        member.record["val_auc"] = float(roc_auc_score(labels, logits))
        log.info("ensemble.member", source=str(member.source),
                 val_auc=round(member.record["val_auc"], 4))
    mean = np.mean(member_logits, axis=0)
    metrics = {"val_auc": float(roc_auc_score(labels, mean)),
               "val_ap": float(average_precision_score(labels, mean))}
    log.info("ensemble.validated", members=len(members), val_auc=round(metrics["val_auc"], 4))

    (out_dir / "classifier").mkdir(parents=True, exist_ok=True)
    shutil.copytree(reference.run / SPLIT_DIR, out_dir / SPLIT_DIR)
    train_config.save(settings, out_dir / SETTINGS_FILE)
    best = out_dir / "classifier" / checkpoint.BEST
    checkpoint.save(best, {
        "kind": "classifier",
        "model_spec": {**reference.state["model_spec"], "architecture": model.architecture,
                       "members": len(members)},
        "settings": reference.state["settings"],
        "limited": False,
        "provenance": {**provenance, "split": str(out_dir / SPLIT_DIR)},
        "model": model.state_dict(),
        "epoch": reference.state["epoch"],
        "metrics": metrics,
        "ensemble": [member.record for member in members],
    })
    calibrate(best, val_set, settings.classifier, runner, workers=0)
    if detector_state is not None:
        (out_dir / "detector").mkdir()
        checkpoint.save(out_dir / "detector" / checkpoint.BEST, detector_state)
    log.info("ensemble.done", checkpoint=str(best), members=len(members),
             detector=detector_state is not None)
    return best


def _member(source: Path) -> Member:
    """A run (directory or best.pt) or a bundle, read and checked on its own."""
    if (source / MANIFEST_FILE).is_file():
        return _bundle_member(source)
    path = source / "classifier" / checkpoint.BEST if source.is_dir() else source
    try:
        state = checkpoint.load(path, "classifier")
    except checkpoint.CheckpointError as exc:
        raise EnsembleError(f"{source}: not a finished classifier run or bundle ({exc})") from None
    if "calibration" not in state:
        raise EnsembleError(f"{path}: no calibration, so the run did not finish; resume it "
                            f"first, then use its {checkpoint.BEST}")
    if state.get("limited"):
        raise EnsembleError(f"{path}: trained on a [data].limit subset (a smoke run)")
    if state["model_spec"].get("members", 1) != 1:
        raise EnsembleError(f"{path}: already an ensemble; give its members instead")
    run = path.parent.parent
    if not (run / SPLIT_DIR / JSON_NAME).is_file():
        raise EnsembleError(f"{path}: its run directory {run} has no {SPLIT_DIR}/{JSON_NAME}")
    record = {"source": str(path), "epoch": state["epoch"],
              "seed": state["settings"]["run"]["seed"]}
    return Member(path, state["model_spec"], state["model"], record, run=run, state=state)


def _bundle_member(source: Path) -> Member:
    try:
        bundle = Bundle.load(source)
    except BundleError as exc:
        raise EnsembleError(str(exc)) from None
    manifest = bundle.manifest
    spec = manifest.classifier
    if not manifest.trained:
        raise EnsembleError(f"{source}: an untrained bundle")
    if spec.members != 1:
        raise EnsembleError(f"{source}: already an ensemble; give its members instead")
    if not spec.variant.startswith("resnet"):
        raise EnsembleError(f"{source}: a {spec.variant} classifier; only a ResNet's weights "
                            "can be read back from a bundle's graph")
    try:
        weights = read_onnx_resnet(bundle.file(CLASSIFIER_FILE), where=str(source))
    except ConfigError as exc:
        raise EnsembleError(str(exc)) from None
    network = FractureClassifier(spec.variant, len(spec.labels))
    missing, unexpected = network.load_state_dict(weights, strict=False)
    if unexpected or [key for key in missing if not key.endswith("num_batches_tracked")]:
        raise EnsembleError(f"{source}: its graph does not give every weight of a "
                            f"{spec.architecture} ({len(missing)} missing)")
    raw = json.loads((source / MANIFEST_FILE).read_text(encoding="utf-8"))
    trained = (raw.get("training") or {}).get("classifier") or {}
    data = trained.get("data") or {}
    record = {"source": str(source), "bundle": f"{manifest.name}-{manifest.version}",
              "epoch": trained.get("epoch", "-"),
              "data": {key: data.get(key) for key in _SAME_DATA}}
    model_spec = {"variant": spec.variant, "input_size": spec.input_size,
                  "labels": list(spec.labels), "mean": list(manifest.mean),
                  "std": list(manifest.std), **crop_entry(manifest.crop)}
    return Member(source, model_spec, network.state_dict(), record)


def _check_compatible(members: Sequence[Member], reference: Member) -> None:
    assert reference.state is not None and reference.run is not None
    split = _split_digest(reference.run)
    provenance = reference.state.get("provenance", {})
    for member in members:
        for key in _SAME_MODEL:
            if _plain(member.spec[key]) != _plain(reference.spec[key]):
                raise EnsembleError(f"{member.source}: {key} {member.spec[key]!r} differs from "
                                    f"{reference.source}'s {reference.spec[key]!r}")
        if trained_crop(member.spec) != trained_crop(reference.spec):
            raise EnsembleError(f"{member.source}: crop {trained_crop(member.spec)!r} differs "
                                f"from {reference.source}'s {trained_crop(reference.spec)!r}")
        if member.run is not None and _split_digest(member.run) != split:
            raise EnsembleError(f"{member.source}: trained on another split than "
                                f"{reference.source}; members must share one "
                                "([data].split_seed)")
        if member.state is None:
            data = member.record["data"]
            differ = [key for key in _SAME_DATA if data.get(key) != provenance.get(key)]
            if differ:
                raise EnsembleError(f"{member.source}: its training data differs from "
                                    f"{reference.source}'s in {', '.join(differ)}")


def _plain(value: Any) -> Any:
    """Lists and tuples alike (a manifest's tuples, a checkpoint's lists)."""
    return list(value) if isinstance(value, list | tuple) else value


def _split_digest(run: Path) -> str:
    return json.loads((run / SPLIT_DIR / JSON_NAME).read_text(encoding="utf-8"))["csv_sha256"]


def _detector(source: Path, reference: Member) -> dict[str, Any]:
    assert reference.run is not None
    path = source / "detector" / checkpoint.BEST if source.is_dir() else source
    try:
        state = checkpoint.load(path, "detector")
    except checkpoint.CheckpointError as exc:
        raise EnsembleError(f"--detector: {exc}") from None
    if "calibration" not in state:
        raise EnsembleError(f"--detector: {path} has no calibration (the run did not finish)")
    run = path.parent.parent
    if not (run / SPLIT_DIR / JSON_NAME).is_file() or \
            _split_digest(run) != _split_digest(reference.run):
        raise EnsembleError(f"--detector: {path} was not trained on {reference.source}'s split")
    return state


def _validation_images(reference: Member, settings: train_config.TrainSettings,
                       ) -> ClassifierImages:
    """The shared validation split, letterboxed as training validated it."""
    assert reference.state is not None and reference.run is not None
    provenance = reference.state.get("provenance", {})
    try:
        sample_set = open_dataset(Path(provenance["dataset"]), settings.data.format or None,
                                  positive=settings.data.positive or None)
    except KeyError:
        raise EnsembleError(f"{reference.source}: the checkpoint does not name its data "
                            "set") from None
    except DatasetError as exc:
        raise EnsembleError(f"{reference.source}: its data set cannot be read ({exc})") from None
    samples = load_split(reference.run / SPLIT_DIR, sample_set).samples(sample_set, "val")
    spec = reference.spec
    images = letterbox_samples(samples, spec["input_size"], crop=trained_crop(spec),
                               desc="decoding val")
    return ClassifierImages(images, mean=spec["mean"], std=spec["std"])


def _logits(network: FractureClassifier, images: ClassifierImages,
            runner: Device) -> tuple[np.ndarray, np.ndarray]:
    loader = DataLoader(images, batch_size=_BATCH)
    logits, labels = classifier_logits(runner.prepare(network), loader, runner)
    return logits, labels.astype(int)
