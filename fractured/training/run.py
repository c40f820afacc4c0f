"""`fractured train`: one run directory from a data set and a settings file.

```
RUN/
  train.toml        the resolved settings (every key), as this run used them
  split/            split.csv + split.json: which image is in train, val and test
    base/           a fold run's base split ([data].folds: training.folds)
  classifier/       last.pt, best.pt (calibrated), history.csv
  detector/         the same for the box detector
```

The split is made once (leakage-safe: near-duplicates and patients grouped) and reused
by every later command on the run, so `fractured evaluate` scores exactly the images
training never saw. A cross-validation fold run's split is one fold of a base split
(training.folds), reused alike. A run directory is never overwritten: continue it with `--resume`
or start another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import structlog

from fractured.training import checkpoint, config
from fractured.training.classifier import train_classifier
from fractured.training.datasets import SampleSet, open_dataset
from fractured.training.datasets.base import Sample
from fractured.training.detector import train_detector
from fractured.training.folds import fold_split_for
from fractured.training.intended_use import body_part_counts
from fractured.training.splits import Split, split_for

log = structlog.get_logger()

SETTINGS_FILE = "train.toml"
SPLIT_DIR = "split"
Task = Literal["classifier", "detector", "both"]
TASKS: tuple[Task, ...] = ("classifier", "detector", "both")


class RunError(Exception):
    """A run that cannot start as asked; the message says what to do instead."""


def train(dataset: Path, out: Path, settings: config.TrainSettings, *, task: Task = "both",
          resume: bool = False) -> dict[str, Path]:
    """Split (or reuse the split), then train the chosen models; their best.pt paths."""
    saved = out / SETTINGS_FILE
    if saved.exists() and not resume:
        raise RunError(f"{out} already holds a run: pass --resume to continue it, "
                       "or choose another --out")
    if resume and not saved.exists():
        raise RunError(f"{out} holds no run to resume ({SETTINGS_FILE} is missing)")
    kinds = ("classifier", "detector") if task == "both" else (task,)
    if resume:
        # Checked before train.toml is rewritten, so a refused resume changes nothing.
        resolved = dataclasses.asdict(settings)
        for kind in kinds:
            checkpoint.check_settings(out / kind / checkpoint.LAST, resolved, kind)
    sample_set = open_dataset(dataset, settings.data.format or None,
                              positive=settings.data.positive or None)
    out.mkdir(parents=True, exist_ok=True)
    split = run_split(sample_set, out, settings)
    config.save(settings, saved)
    train_part = _limited(split.samples(sample_set, "train"), settings.data.limit,
                          settings.run.seed)
    val_part = _limited(split.samples(sample_set, "val"), settings.data.limit,
                        settings.run.seed)
    provenance = _provenance(sample_set, split, out, train_part, val_part)
    results: dict[str, Path] = {}
    if "classifier" in kinds:
        results["classifier"] = train_classifier(train_part, val_part, settings,
                                                 out / "classifier", resume=resume,
                                                 provenance=provenance)
    if "detector" in kinds:
        if not sample_set.has_boxes:
            message = (f"{dataset}: the {sample_set.format} data set has no boxes, so no "
                       "detector can be trained on it")
            if task == "detector":
                raise RunError(message)
            log.warning("train.detector_skipped", reason=message)
        else:
            results["detector"] = train_detector(train_part, val_part, settings,
                                                 out / "detector", resume=resume,
                                                 provenance=provenance)
    return results


def run_split(sample_set: SampleSet, out: Path, settings: config.TrainSettings) -> Split:
    """The run's split, made on first use and reused after (see training.splits); with
    [data].folds, its fold of the base split (see training.folds)."""
    data = settings.data
    seed = data.split_seed if data.split_seed >= 0 else settings.run.seed
    params: dict[str, Any] = {"val": data.val, "test": data.test, "seed": seed}
    if data.duplicate_threshold >= 0:
        params["duplicate_threshold"] = data.duplicate_threshold
    if data.folds:
        base = Path(data.base_split).expanduser() if data.base_split else None
        return fold_split_for(sample_set, out / SPLIT_DIR, folds=data.folds, fold=data.fold,
                              base_split=base, **params)
    return split_for(sample_set, out / SPLIT_DIR, **params)


def _provenance(sample_set: SampleSet, split: Split, out: Path, train_part: Sequence[Sample],
                val_part: Sequence[Sample]) -> dict[str, Any]:
    """What a checkpoint records about its data (copied into the bundle's manifest)."""
    return {
        "dataset": str(sample_set.root), "format": sample_set.format,
        "images": len(sample_set), "split": str(out / SPLIT_DIR),
        "split_summary": split.summary(),
        "train_images": len(train_part), "train_positive": sum(s.label for s in train_part),
        "val_images": len(val_part), "val_positive": sum(s.label for s in val_part),
        "body_parts": body_part_counts(train_part),
    }


def _limited(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """At most `limit` samples (0 = all), keeping the label ratio and at least one of each
    label, for smoke runs."""
    if limit <= 0 or len(samples) <= limit:
        return samples
    rng = np.random.default_rng(seed)
    positives = [s for s in samples if s.label == 1]
    negatives = [s for s in samples if s.label == 0]
    take_pos = min(len(positives), max(1, round(limit * len(positives) / len(samples))))
    take_neg = min(len(negatives), max(1, limit - take_pos))
    chosen = ([positives[i] for i in rng.permutation(len(positives))[:take_pos]]
              + [negatives[i] for i in rng.permutation(len(negatives))[:take_neg]])
    return sorted(chosen, key=lambda sample: str(sample.path))
