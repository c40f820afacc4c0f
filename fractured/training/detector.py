"""Train the fracture-box detector (Faster R-CNN) on a split's boxes, like the classifier:
checkpoint every epoch, keep the best validation AP, fit box-score operating points.

Each epoch sees every training image with boxes and a fresh random draw of images
without (`negatives_per_positive` of them per positive), so negatives teach the
detector what is not a fracture without drowning the few positives. Samples whose boxes
are unknown (a format without boxes) are left out: they are neither.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from torch.utils.data import DataLoader, Subset

from fractured.engine.bundle import FRACTURE_LABEL
from fractured.engine.models import FractureDetector
from fractured.training import checkpoint
from fractured.training.config import DetectorSettings, TrainSettings
from fractured.training.data import (
    DetectorImages,
    collate_detection,
    crop_entry,
    letterbox_samples,
)
from fractured.training.datasets.base import DatasetError, Sample
from fractured.training.evaluation.detection import detection_metrics, score_threshold_at_fp
from fractured.training.export import IMAGENET_MEAN, IMAGENET_STD
from fractured.training.loops import Device, detector_outputs, train_detector_epoch
from fractured.training.schedule import (
    BestTracker,
    extend_schedule,
    hold_batchnorm,
    lr_schedule,
    optimiser,
    seed_everything,
    set_backbone_frozen,
    step_schedule,
    write_history,
)
from fractured.training.transforms import train_transform
from fractured.training.weights import load_initial_weights

log = structlog.get_logger()


def train_detector(train: Sequence[Sample], val: Sequence[Sample], settings: TrainSettings,
                   out_dir: Path, *, resume: bool = False,
                   provenance: dict[str, Any] | None = None) -> Path:
    """Run the detector's epochs into `out_dir`; returns the calibrated best.pt path."""
    cfg = settings.detector
    train = [sample for sample in train if sample.boxes is not None]
    val = [sample for sample in val if sample.boxes is not None]
    for name, part in (("train", train), ("val", val)):
        if not any(sample.boxes for sample in part):
            raise DatasetError(f"the {name} split has no image with boxes: the detector "
                               "needs fracture boxes (YOLO, COCO or CSV boxes)")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = Device.choose(settings.run.device, amp=settings.run.amp,
                           channels_last=settings.run.channels_last,
                           cpu_bf16=settings.run.cpu_bf16)
    seed_everything(settings.run.seed)
    size = cfg.input_size
    norm = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    crop = settings.data.crop
    train_images = letterbox_samples(train, size, crop=crop, desc="decoding train")
    val_images = letterbox_samples(val, size, crop=crop, desc="decoding val")
    train_set = DetectorImages(train_images, **norm,
                               transform=train_transform(settings.augment, boxes=True))
    val_set = DetectorImages(val_images, **norm)
    positives = [i for i, sample in enumerate(train_images.samples) if sample.boxes]
    negatives = [i for i, sample in enumerate(train_images.samples) if not sample.boxes]
    provenance = {**(provenance or {}),
                  "unreadable": [*train_images.unreadable, *val_images.unreadable]}
    log.info("train.detector.start", backbone=cfg.backbone, input_size=size,
             device=str(device.torch_device), train_positive=len(positives),
             train_negative=len(negatives), val=len(val_images),
             val_boxes=sum(len(sample.boxes or ()) for sample in val_images.samples),
             unreadable=len(provenance["unreadable"]))

    model = FractureDetector(cfg.backbone, num_labels=1, input_size=size)
    if cfg.initial_weights:
        load_initial_weights(model.model, cfg.initial_weights, where="[detector].initial_weights")
    model = device.prepare(model)
    optimizer = optimiser([p for p in model.parameters() if p.requires_grad], cfg,
                          backbone=model.model.backbone.body.parameters())
    schedule = lr_schedule(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=device.amp)
    tracker = BestTracker(patience=cfg.early_stopping)
    meta = _metadata(model, cfg, settings, provenance)
    last, best = out_dir / checkpoint.LAST, out_dir / checkpoint.BEST
    start = 0
    if resume and last.exists():
        state = checkpoint.load(last, "detector")
        checkpoint.check_resumable(state, meta, last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        extend_schedule(schedule, cfg.epochs)
        scaler.load_state_dict(state["scaler"])
        tracker.load_state_dict(state["tracker"])
        start = state["epoch"] + 1
        log.info("train.resume", checkpoint=str(last), next_epoch=start)

    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=settings.run.workers,
                            collate_fn=collate_detection)
    for epoch in range(start, cfg.epochs):
        if tracker.should_stop:
            break
        began = time.monotonic()
        seed_everything(settings.run.seed + epoch)
        # The feature extractor that initial weights fill; the FPN above it starts random
        # and must train from the first epoch.
        set_backbone_frozen(model.model.backbone.body, epoch < cfg.freeze_epochs)
        held = (hold_batchnorm(model.model.backbone.body) if cfg.batchnorm == "frozen"
                else [])
        chosen = _epoch_images(positives, negatives, cfg.negatives_per_positive,
                               settings.run.seed + epoch)
        loader = DataLoader(Subset(train_set, chosen), batch_size=cfg.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(settings.run.seed + epoch),
                            num_workers=settings.run.workers, collate_fn=collate_detection,
                            drop_last=len(chosen) > cfg.batch_size)
        losses = train_detector_epoch(model, loader, optimizer, scaler, device,
                                      desc=f"epoch {epoch + 1}/{cfg.epochs}", held=held)
        found = list(detector_outputs(model, val_loader, device))
        metrics = detection_metrics([(boxes, scores) for boxes, scores, _ in found],
                                    [truth for _, _, truth in found])
        row = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": losses["loss"], "val_ap50": _number(metrics["ap50"]),
               "val_ap50_95": _number(metrics["ap50_95"]),
               "val_froc": _number(metrics["froc_score"]),
               "seconds": round(time.monotonic() - began, 1)}
        score = row[f"val_{cfg.best_metric}"]
        score = -1.0 if np.isnan(score) else score
        improved = tracker.record(row, score)
        step_schedule(schedule, score)
        write_history(out_dir / checkpoint.HISTORY, tracker.history)
        if improved:
            checkpoint.save(best, {**meta, "model": model.state_dict(), "epoch": epoch,
                                   "metrics": row})
        checkpoint.save(last, {**meta, "model": model.state_dict(), "epoch": epoch,
                               "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict(),
                               "scaler": scaler.state_dict(), "tracker": tracker.state_dict()})
        log.info("train.epoch", task="detector", best=improved, **row)
        if tracker.should_stop:
            log.info("train.early_stop", epoch=epoch, best_epoch=tracker.best_epoch,
                     patience=cfg.early_stopping)
    return calibrate(best, val_set, cfg, device, settings.run.workers)


def calibrate(best: Path, val_set: DetectorImages, cfg: DetectorSettings, device: Device,
              workers: int) -> Path:
    """Box-score operating points from validation: the lowest score thresholds keeping
    false boxes per image within the configured budgets; stored in best.pt."""
    state = checkpoint.load(best, "detector")
    spec = state["model_spec"]
    model = FractureDetector(spec["backbone"], num_labels=1, input_size=spec["input_size"])
    model.load_state_dict(state["model"])
    loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=workers,
                        collate_fn=collate_detection)
    found = list(detector_outputs(device.prepare(model), loader, device))
    predictions = [(boxes, scores) for boxes, scores, _ in found]
    truths = [truth for _, _, truth in found]
    sensitive = score_threshold_at_fp(predictions, truths, cfg.sensitive_fp_per_image)
    specific = score_threshold_at_fp(predictions, truths, cfg.specific_fp_per_image)
    state["calibration"] = {
        "operating_points": {
            "high_sensitivity": sensitive["threshold"],
            # fewer false boxes allowed can only mean a threshold at least as high
            "high_specificity": max(specific["threshold"], sensitive["threshold"])},
        "achieved_on_val": {"high_sensitivity": sensitive, "high_specificity": specific},
        "val_images": len(truths),
    }
    checkpoint.save(best, state)
    log.info("train.calibrated", task="detector", **state["calibration"]["operating_points"])
    return best


def _epoch_images(positives: list[int], negatives: list[int], ratio: float,
                  seed: int) -> list[int]:
    """All positives and a seeded random draw of negatives for one epoch."""
    rng = np.random.default_rng(seed)
    count = min(len(negatives), round(ratio * len(positives)))
    drawn = rng.choice(len(negatives), size=count, replace=False) if count else []
    return positives + [negatives[i] for i in drawn]


def _metadata(model: FractureDetector, cfg: DetectorSettings, settings: TrainSettings,
              provenance: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": "detector",
        "model_spec": {"architecture": model.architecture, "backbone": cfg.backbone,
                       "labels": [FRACTURE_LABEL], "input_size": cfg.input_size,
                       "detections_per_image": model.detections_per_image,
                       "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                       **crop_entry(settings.data.crop)},
        "settings": dataclasses.asdict(settings),
        "limited": settings.data.limit > 0,
        "provenance": provenance,
    }


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)
