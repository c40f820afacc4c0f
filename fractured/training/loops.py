"""Loops over the data: a training epoch, or the model's outputs on a split.

Kept apart from the run orchestration (run.py) as torchvision's detection references
do, so `fractured evaluate` computes its outputs with the very loop validation used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader
from tqdm import tqdm

from fractured.engine.models import Classifier, FractureClassifier, FractureDetector
from fractured.training.losses import BoxSupervision


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN or infinite loss); lower the learning rate."""


@dataclass(frozen=True)
class Device:
    """Where tensors go and which CUDA speed-ups apply (none on a CPU)."""

    torch_device: torch.device
    amp: bool
    channels_last: bool
    cpu_bf16: bool = False

    @classmethod
    def choose(cls, requested: str, *, amp: bool, channels_last: bool,
               cpu_bf16: bool = False) -> Device:
        if requested == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("[run].device = \"cuda\" but no CUDA device is available")
        cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
        return cls(torch.device("cuda" if cuda else "cpu"), amp and cuda, channels_last and cuda,
                   cpu_bf16 and not cuda)

    def autocast(self, *, training: bool = False) -> contextlib.AbstractContextManager[object]:
        """float16 autocast on CUDA when amp is on; bfloat16 on the CPU when cpu_bf16 is on,
        for training steps only: validation, calibration and evaluation run in float32,
        as the node's ONNX graphs do, so the thresholds fit what the node computes."""
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        if self.cpu_bf16 and training:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.torch_device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.torch_device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def progress(loader: Iterable, desc: str) -> tqdm:
    """A progress bar on a terminal; silent in a log file (epoch events say it all)."""
    return tqdm(loader, desc=desc, unit="batch", leave=False, disable=None, mininterval=2.0)


def train_classifier_epoch(model: FractureClassifier, loader: DataLoader, loss_fn: nn.Module,
                           optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                           device: Device, desc: str,
                           average: AveragedModel | None = None,
                           box_loss: BoxSupervision | None = None,
                           box_weight: float = 0.0) -> float:
    """One epoch of classifier training; returns the mean training loss. `average`, when
    given, is updated after every step (weight averaging, see classifier.py); with
    `box_loss`, batches carry box masks (data.BoxedClassifierImages) and `box_weight`
    times the CAM's box loss is added."""
    model.train()
    total, count = 0.0, 0
    bar = progress(loader, desc)
    for batch in bar:
        images, labels = device.images(batch[0]), batch[1].to(device.torch_device)
        with device.autocast(training=True):
            logits, cam = model(images)
            loss = loss_fn(logits[:, 0], labels)
            if box_loss is not None:
                masks, kinds = (part.to(device.torch_device) for part in batch[2:4])
                loss = loss + box_weight * box_loss(cam[:, 0], masks, kinds)
        _step(loss, optimizer, scaler)
        if average is not None:
            average.update_parameters(model)
        total += float(loss.detach()) * len(labels)
        count += len(labels)
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


@torch.no_grad()
def classifier_logits(model: Classifier, loader: DataLoader,
                      device: Device) -> tuple[np.ndarray, np.ndarray]:
    """Fracture logits and labels for every image of `loader`, in its order."""
    model.eval()
    logits, labels = [], []
    for images, targets in progress(loader, "predicting"):
        with device.autocast():
            out, _ = model(device.images(images))
        logits.append(out[:, 0].float().cpu())
        labels.append(targets)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def train_detector_epoch(model: FractureDetector, loader: DataLoader,
                         optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                         device: Device, desc: str,
                         held: Sequence[nn.Module] = ()) -> dict[str, float]:
    """One epoch of detector training through torchvision's loss dict; mean of each loss.

    `held` modules stay in eval mode (BatchNorm with frozen statistics)."""
    model.model.train()
    for module in held:
        module.eval()
    sums: dict[str, float] = {}
    count = 0
    bar = progress(loader, desc)
    for images, targets in bar:
        images = device.images(images)
        targets = [{key: value.to(device.torch_device) for key, value in target.items()}
                   for target in targets]
        with device.autocast(training=True):
            losses = model.model(list(images), targets)
            loss = sum(losses.values())
        _step(loss, optimizer, scaler)
        count += len(targets)
        for name, value in {"loss": loss, **losses}.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(targets)
        bar.set_postfix(loss=f"{sums['loss'] / count:.4f}")
    return {name: value / max(count, 1) for name, value in sums.items()}


@torch.no_grad()
def detector_outputs(model: FractureDetector, loader: DataLoader,
                     device: Device) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(boxes (K, 4), scores (K,), ground-truth boxes (M, 4)) per image, model pixels.

    Empty slots of the fixed-K output (score 0) are dropped here."""
    model.eval()
    for images, targets in progress(loader, "detecting"):
        with device.autocast():
            boxes, scores, _ = model(device.images(images))
        for found, score, target in zip(boxes.float().cpu().numpy(),
                                         scores.float().cpu().numpy(), targets, strict=True):
            keep = score > 0
            yield found[keep], score[keep], target["boxes"].numpy()


def _step(loss: torch.Tensor, optimizer: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler) -> None:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(f"training loss became {value}; lower the learning rate "
                            "(resume from last.pt keeps the epochs done so far)")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
