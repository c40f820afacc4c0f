"""The parts of a training run both models share: optimiser, LR schedule, best-epoch
bookkeeping with early stopping, the per-epoch history file, and seeding.

Every piece can be saved into and restored from a checkpoint, so a run resumed after a
crash (or at the next session) continues as if it had never stopped.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fractured.durable import write_durably
from fractured.training.config import Optimisation


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices); called at each epoch's start with
    seed + epoch, so a resumed run draws the same augmentations as an unbroken one."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def optimiser(parameters: Iterable[nn.Parameter], settings: Optimisation,
              backbone: Iterable[nn.Parameter] = ()) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay) over the trainable parameters; those also in
    `backbone` form a second group at `backbone_lr` times the learning rate."""
    slow = {id(parameter) for parameter in backbone} if settings.backbone_lr != 1.0 else set()
    parameters = list(parameters)
    groups = [{"params": [p for p in parameters if id(p) not in slow]}]
    if len(groups[0]["params"]) < len(parameters):
        groups.append({"params": [p for p in parameters if id(p) in slow],
                       "lr": settings.lr * settings.backbone_lr})
    return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer,
                settings: Optimisation) -> torch.optim.lr_scheduler.LRScheduler:
    """The configured schedule, after `warmup_epochs` of linear rise when set;
    `step_schedule` drives it once per epoch."""
    if settings.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=settings.plateau_factor,
            patience=settings.plateau_patience)
    warmup = settings.warmup_epochs
    main: torch.optim.lr_scheduler.LRScheduler
    if settings.schedule == "cosine":
        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                          T_max=settings.epochs - warmup)
    else:
        main = torch.optim.lr_scheduler.StepLR(optimizer, step_size=settings.step_size,
                                               gamma=settings.gamma)
    if not warmup:
        return main
    rise = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / (warmup + 1),
                                             total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [rise, main], milestones=[warmup])


def step_schedule(schedule: torch.optim.lr_scheduler.LRScheduler, score: float) -> None:
    """Advance one epoch; plateau schedules watch the validation score (higher = better)."""
    if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
        schedule.step(score)
    else:
        schedule.step()


def extend_schedule(schedule: torch.optim.lr_scheduler.LRScheduler, epochs: int) -> None:
    """After a resume with a new epoch budget, make a cosine schedule end at the new last
    epoch (its saved state would otherwise reach zero at the old one)."""
    warmup = 0
    if isinstance(schedule, torch.optim.lr_scheduler.SequentialLR):
        warmup = schedule._milestones[0]
        schedule = schedule._schedulers[-1]
    if isinstance(schedule, torch.optim.lr_scheduler.CosineAnnealingLR):
        schedule.T_max = epochs - warmup


def set_backbone_frozen(backbone: nn.Module, frozen: bool) -> None:
    """Freeze (warm-up with initial weights) or unfreeze the backbone's parameters."""
    for parameter in backbone.parameters():
        parameter.requires_grad_(not frozen)


def hold_batchnorm(backbone: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Stop the backbone's BatchNorm layers learning: no gradient for their affine; the
    caller keeps them in eval mode (running statistics used, not updated) after each
    `train()`. Returns the layers."""
    layers = [module for module in backbone.modules()
              if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)
    return layers


@dataclass
class BestTracker:
    """The best validation score so far (higher is better), and early stopping.

    `patience` epochs without improvement stop the run (0 = never stop early)."""

    patience: int
    best: float | None = None
    best_epoch: int = -1
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def record(self, row: Mapping[str, Any], score: float) -> bool:
        """Add an epoch's row; True when `score` is a new best."""
        self.history.append(dict(row))
        if self.best is None or score > self.best:
            self.best, self.best_epoch, self.stale = score, int(row["epoch"]), 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "stale": self.stale,
                "history": self.history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.stale, self.history = state["stale"], list(state["history"])


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    """Every epoch's row as CSV (the columns of the first row, in order)."""
    if not rows:
        return
    columns = list(rows[0])
    lines = [",".join(columns)]
    lines += [",".join(_cell(row.get(column)) for column in columns) for row in rows]
    write_durably(path, ("\n".join(lines) + "\n").encode())


def read_history(path: Path) -> list[dict[str, float]]:
    """history.csv back as rows of numbers (empty cells are NaN)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return [{key: float(value) if value else float("nan") for key, value in row.items()}
                for row in csv.DictReader(fh)]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
