"""Training checkpoints: everything to resume a run, and everything build-engine needs.

A checkpoint is one torch file (a dict of plain values and state dicts). `last.pt` is
written after every epoch (resume from it after a crash or the end of a session);
`best.pt` when the validation metric improves, and at the end of a run it gains the
calibration fitted on validation (temperature and operating points), which
`fractured build-engine` carries into the bundle. Files are written to a temporary
name, fsynced and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from fractured.durable import write_durably

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
HISTORY = "history.csv"
Kind = Literal["classifier", "detector"]


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and why."""


def save(path: Path, content: Mapping[str, Any]) -> None:
    """Atomically write a checkpoint dict (adds the format version)."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **content}, buffer)
    write_durably(Path(path), buffer.getbuffer(), mode=0o644)


def load(path: Path, kind: Kind | None = None) -> dict[str, Any]:
    """Read a checkpoint written by `save`, checking its format and (optionally) kind.

    weights_only loading: a checkpoint is data (tensors, numbers, strings), never code,
    so one received from elsewhere cannot execute anything when opened.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or foreign files
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from exc
    if not isinstance(content, dict) or content.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a fractured checkpoint of format {FORMAT_VERSION}")
    if kind is not None and content.get("kind") != kind:
        raise CheckpointError(f"{path}: a {content.get('kind')} checkpoint, expected {kind}")
    return content


def check_resumable(state: Mapping[str, Any], meta: Mapping[str, Any], path: Path) -> None:
    """A resume must train the same model on the same data: only the epoch budget, early
    stopping and where it runs ([run]) may change; anything else is a new run."""
    changed = changed_settings(state["settings"], meta["settings"], meta["kind"])
    if state["model_spec"] != meta["model_spec"]:
        changed.append("the model")
    _refuse(changed, path)


def check_settings(path: Path, settings: Mapping[str, Any], kind: Kind) -> None:
    """Refuse, before anything is written, to resume the checkpoint at `path` (when
    there is one) with settings that would make a different run."""
    if path.is_file():
        _refuse(changed_settings(load(path, kind)["settings"], settings, kind), path)


def changed_settings(before: Mapping[str, Any], now: Mapping[str, Any], kind: Kind) -> list[str]:
    """The `[section].key`s that differ and matter to a `kind` run. A key the checkpoint
    does not have (added in a later version) counts as what the older version did: its
    BEFORE_IT_EXISTED value, else its default."""
    from fractured.training.config import BEFORE_IT_EXISTED, TrainSettings

    defaults = dataclasses.asdict(TrainSettings())
    free = {(kind, "epochs"), (kind, "early_stopping")}
    return [f"[{section}].{key}" for section in ("data", "augment", kind)
            for key, value in now[section].items()
            if (section, key) not in free
            and before[section].get(key, BEFORE_IT_EXISTED.get(
                (section, key), defaults[section][key])) != value]


def _refuse(changed: list[str], path: Path) -> None:
    if changed:
        raise CheckpointError(f"{path}: cannot resume with different {', '.join(changed)}; "
                              "start a new run directory instead")
