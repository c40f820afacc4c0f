"""Train the fracture classifier on a split, checkpoint every epoch, calibrate on validation.

The run ends with `best.pt` (the epoch with the best validation metric) carrying the
temperature and the two operating points fitted on the validation split (and a pair per
body region where the data says each image's); test images are never looked at here
(that is `fractured evaluate`'s job).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, WeightedRandomSampler

from fractured.engine.bundle import BY_REGION, FRACTURE_LABEL
from fractured.engine.models import INPUT_SIZES, FractureClassifier, build_classifier
from fractured.training import checkpoint
from fractured.training.config import ClassifierSettings, TrainSettings
from fractured.training.data import (
    BoxedClassifierImages,
    ClassifierImages,
    crop_entry,
    letterbox_samples,
)
from fractured.training.datasets.base import DatasetError, Sample
from fractured.training.evaluation.calibration import (
    RegionRule,
    choose_operating_points,
    expected_flag_rates,
    fit_region_points,
    fit_shift_and_temperature,
    points_rule,
)
from fractured.training.export import IMAGENET_MEAN, IMAGENET_STD
from fractured.training.loops import Device, classifier_logits, train_classifier_epoch
from fractured.training.losses import BoxSupervision, FractureLoss
from fractured.training.pretrained import describe, is_pretrained_name
from fractured.training.schedule import (
    BestTracker,
    extend_schedule,
    lr_schedule,
    optimiser,
    seed_everything,
    set_backbone_frozen,
    step_schedule,
    write_history,
)
from fractured.training.transforms import train_transform
from fractured.training.weights import load_initial_weights, restore_batchnorm

log = structlog.get_logger()


def train_classifier(train: Sequence[Sample], val: Sequence[Sample], settings: TrainSettings,
                     out_dir: Path, *, resume: bool = False,
                     provenance: dict[str, Any] | None = None) -> Path:
    """Run the classifier's epochs into `out_dir`; returns the calibrated best.pt path.

    `resume` continues from out_dir/last.pt (a finished run is only re-calibrated);
    `provenance` (data set, split) is stored in the checkpoints for build-engine.
    """
    cfg = settings.classifier
    out_dir.mkdir(parents=True, exist_ok=True)
    device = Device.choose(settings.run.device, amp=settings.run.amp,
                           channels_last=settings.run.channels_last,
                           cpu_bf16=settings.run.cpu_bf16)
    size = cfg.input_size or INPUT_SIZES[cfg.variant]
    seed_everything(settings.run.seed)
    norm = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    crop = settings.data.crop
    train_images = letterbox_samples(train, size, crop=crop, desc="decoding train")
    val_images = letterbox_samples(val, size, crop=crop, desc="decoding val")
    _require_both_labels(train_images.samples, "train")
    _require_both_labels(val_images.samples, "val")
    train_set: ClassifierImages | BoxedClassifierImages
    box_loss = None
    if cfg.box_weight > 0:
        if not any(sample.label and sample.boxes for sample in train_images.samples):
            raise DatasetError("[classifier].box_weight needs fracture images with boxes; "
                               "this data set has none")
        train_set = BoxedClassifierImages(
            train_images, transform=train_transform(settings.augment, boxes=True), **norm)
        box_loss = BoxSupervision()
    else:
        train_set = ClassifierImages(train_images, transform=train_transform(settings.augment),
                                     **norm)
    val_set = ClassifierImages(val_images, **norm)
    train_labels = [sample.label for sample in train_images.samples]
    log.info("train.classifier.start", variant=cfg.variant, input_size=size,
             device=str(device.torch_device), train=len(train_images),
             train_positive=sum(train_labels), val=len(val_images),
             val_positive=sum(s.label for s in val_images.samples),
             unreadable=len(train_images.unreadable) + len(val_images.unreadable))
    provenance = {**(provenance or {}),
                  "unreadable": [*train_images.unreadable, *val_images.unreadable]}
    if is_pretrained_name(cfg.initial_weights):  # origin, version, checksum and licence
        provenance["pretrained"] = describe(cfg.initial_weights,
                                            "[classifier].initial_weights")

    model = FractureClassifier(variant=cfg.variant, num_labels=1)
    last, best = out_dir / checkpoint.LAST, out_dir / checkpoint.BEST
    if cfg.initial_weights and not (resume and last.exists()):
        load_initial_weights(model, cfg.initial_weights, where="[classifier].initial_weights")
        # weights read back from a bundle's graph: BatchNorm statistics from the images
        restore_batchnorm(model, _batches(train_set, train_labels, cfg, settings))
    model = device.prepare(model)
    # Weight averaging: the averaged copy is what is validated, kept as best and shipped.
    average = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                             use_buffers=True) if cfg.ema_decay else None)
    validated = average.module if average is not None else model
    positives = sum(train_labels)
    pos_weight = ((len(train_labels) - positives) / positives
                  if cfg.imbalance == "class_weights" else None)
    loss_fn = FractureLoss(focal_weight=cfg.focal_weight, gamma=cfg.focal_gamma,
                           pos_weight=pos_weight)
    optimizer = optimiser(model.parameters(), cfg, backbone=model.features.parameters())
    schedule = lr_schedule(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.amp)
    tracker = BestTracker(patience=cfg.early_stopping)
    start = 0
    meta = _metadata(cfg, size, settings, provenance)
    if resume and last.exists():
        state = checkpoint.load(last, "classifier")
        checkpoint.check_resumable(state, meta, last)
        model.load_state_dict(state["model"])
        if average is not None:
            average.load_state_dict(state["average"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        extend_schedule(schedule, cfg.epochs)
        scaler.load_state_dict(state["scaler"])
        tracker.load_state_dict(state["tracker"])
        start = state["epoch"] + 1
        log.info("train.resume", checkpoint=str(last), next_epoch=start)

    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, shuffle=False,
                            num_workers=settings.run.workers)
    for epoch in range(start, cfg.epochs):
        if tracker.should_stop:
            break
        began = time.monotonic()
        seed_everything(settings.run.seed + epoch)
        set_backbone_frozen(model.features, epoch < cfg.freeze_epochs)
        train_loss = train_classifier_epoch(
            model, _train_loader(train_set, train_labels, cfg, settings, epoch), loss_fn,
            optimizer, scaler, device, desc=f"epoch {epoch + 1}/{cfg.epochs}", average=average,
            box_loss=box_loss, box_weight=cfg.box_weight)
        logits, labels = classifier_logits(validated, val_loader, device)
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
               **_validation_metrics(logits, labels, loss_fn),
               "seconds": round(time.monotonic() - began, 1)}
        score = -row["val_loss"] if cfg.best_metric == "loss" else row[f"val_{cfg.best_metric}"]
        improved = tracker.record(row, score)
        step_schedule(schedule, score)
        write_history(out_dir / checkpoint.HISTORY, tracker.history)
        if improved:
            checkpoint.save(best, {**meta, "model": validated.state_dict(), "epoch": epoch,
                                   "metrics": row})
        extra = {"average": average.state_dict()} if average is not None else {}
        checkpoint.save(last, {**meta, **extra, "model": model.state_dict(), "epoch": epoch,
                               "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict(),
                               "scaler": scaler.state_dict(), "tracker": tracker.state_dict()})
        log.info("train.epoch", task="classifier", best=improved, **row)
        if tracker.should_stop:
            log.info("train.early_stop", epoch=epoch, best_epoch=tracker.best_epoch,
                     patience=cfg.early_stopping)
    return calibrate(best, val_set, cfg, device, settings.run.workers)


def calibrate(best: Path, val_set: ClassifierImages, cfg: ClassifierSettings, device: Device,
              workers: int) -> Path:
    """Fit the logit shift, temperature and operating points on validation with the best
    weights; store them in best.pt (the shift in the head's bias, the rest under
    `calibration`), which build-engine copies into the bundle. Where validation images
    have a body part of a region (engine.regions), each region's points too
    (`choose_region_operating_points`); none are written where none has."""
    state = checkpoint.load(best, "classifier")
    spec = state["model_spec"]
    model = build_classifier(spec["variant"], 1, spec.get("members", 1))
    model.load_state_dict(state["model"])
    loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=workers)
    logits, labels = classifier_logits(device.prepare(model), loader, device)
    # Class weights shift the logits; the shift goes into the head's bias (logit = mean
    # of the CAM, so the bias moves both alike) and the bundle keeps one temperature.
    shift, temperature = fit_shift_and_temperature(logits, labels)
    for key in [key for key in state["model"] if key.split(".")[-2:] == ["head", "bias"]]:
        # one head, or each member's: the ensemble's mean logit moves by the same shift
        state["model"][key] = state["model"][key] + shift
    prob = 1.0 / (1.0 + np.exp(-(logits + shift) / temperature))
    points, achieved = choose_operating_points(labels, prob,
                                               sensitivity=cfg.target_sensitivity,
                                               specificity=cfg.target_specificity)
    body_parts = [sample.body_part for sample in val_set.data.samples]
    by_region = fit_region_points(
        labels, prob, body_parts, points,
        RegionRule(cfg.region_min_fractures, cfg.region_min_normals,
                   cfg.region_min_specificity),
        sensitivity=cfg.target_sensitivity, specificity=cfg.target_specificity)
    pooled = {"high_sensitivity": points.high_sensitivity,
              "high_specificity": points.high_specificity}
    previous = state.get("calibration", {}).get("logit_shift", 0.0)
    state["calibration"] = {
        "temperature": float(temperature),
        # total added to the head's bias by every calibration of this checkpoint
        "logit_shift": float(previous + shift),
        "operating_points": pooled,
        **({BY_REGION: by_region} if by_region else {}),
        "expected_flag_rates": expected_flag_rates(
            prob, body_parts, points_rule(pooled, by_region)),
        "achieved_on_val": achieved,
        "val_images": len(labels),
    }
    checkpoint.save(best, state)
    log.info("train.calibrated", task="classifier", temperature=round(temperature, 4),
             logit_shift=round(shift, 4),
             high_sensitivity=round(points.high_sensitivity, 4),
             high_specificity=round(points.high_specificity, 4))
    return best


def _metadata(cfg: ClassifierSettings, size: int, settings: TrainSettings,
              provenance: dict[str, Any]) -> dict[str, Any]:
    """What every classifier checkpoint says about itself."""
    probe = FractureClassifier(variant=cfg.variant, num_labels=1)
    return {
        "kind": "classifier",
        "model_spec": {"architecture": probe.architecture, "variant": cfg.variant,
                       "labels": [FRACTURE_LABEL], "input_size": size,
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       **crop_entry(settings.data.crop)},
        "settings": dataclasses.asdict(settings),
        # A run on a `[data].limit` subset is a smoke test, never a model to ship.
        "limited": settings.data.limit > 0,
        "provenance": provenance,
    }


def _validation_metrics(logits: np.ndarray, labels: np.ndarray,
                        loss_fn: FractureLoss) -> dict[str, float]:
    prob = 1.0 / (1.0 + np.exp(-logits))
    both = 0 < labels.sum() < len(labels)
    with torch.no_grad():
        loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(labels)))
    return {"val_loss": loss,
            "val_auc": float(roc_auc_score(labels, prob)) if both else float("nan"),
            "val_ap": float(average_precision_score(labels, prob)) if both else float("nan"),
            "val_f1": float(f1_score(labels, prob >= 0.5, zero_division=0))}


def _train_loader(data: ClassifierImages | BoxedClassifierImages, labels: list[int],
                  cfg: ClassifierSettings, settings: TrainSettings, epoch: int) -> DataLoader:
    """This epoch's shuffled (or class-balanced) batches, seeded by seed + epoch."""
    generator = torch.Generator().manual_seed(settings.run.seed + epoch)
    sampler = None
    if cfg.imbalance == "sampler":
        counts = np.bincount(labels, minlength=2)
        weights = [1.0 / counts[label] for label in labels]
        sampler = WeightedRandomSampler(weights, num_samples=len(labels), replacement=True,
                                        generator=generator)
    return DataLoader(data, batch_size=cfg.batch_size, shuffle=sampler is None,
                      sampler=sampler, generator=generator, num_workers=settings.run.workers,
                      drop_last=len(data) > cfg.batch_size, persistent_workers=False)


# Augmented training batches that measure a restored BatchNorm's statistics (256 images
# at the default batch size: per-channel means and variances settle well before that).
RESTORE_BATCHES = 8


def _batches(data: ClassifierImages | BoxedClassifierImages, labels: list[int],
             cfg: ClassifierSettings, settings: TrainSettings) -> Iterator[torch.Tensor]:
    """The images of the first RESTORE_BATCHES batches of epoch 0's loader."""
    for index, batch in enumerate(_train_loader(data, labels, cfg, settings, 0)):
        if index == RESTORE_BATCHES:
            return
        yield batch[0]


def _require_both_labels(samples: Sequence[Sample], split: str) -> None:
    positives = sum(sample.label for sample in samples)
    if not samples or positives in (0, len(samples)):
        raise DatasetError(f"the {split} split has {positives} fracture and "
                           f"{len(samples) - positives} other images: it needs both")
