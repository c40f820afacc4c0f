"""K-fold cross-validation splits: a base split's train and val parts dealt into K folds.

One validation part of a few hundred images gives an AUC whose noise is as large as the
differences between the recipes it is asked to choose between. With `[data].folds` = K,
K runs of one recipe each validate on another fold and train on the other K - 1, so every
train+val image is scored once by a model that never trained on it (`fractured cv` pools
those scores), and the test part is never looked at to choose anything.

A fold split is derived from a base split, never made from the data set afresh:

- the test part is the base's, entry for entry, so fold runs and plain runs of the same
  base are scored on the same held-out images;
- the base's train and val parts together are dealt into K folds by whole leakage groups
  (the base's group column: same patient, same study or near-duplicates) and stratified
  by (label, body part), by the placement that made the base (`splits.place_groups`);
- the deal depends only on the base, K and the seed, never on which fold a run
  validates on, so the K runs' validation folds are disjoint and cover train+val.

In a run directory the fold split is `split/` (what evaluate, ensemble, build-engine and
the rest read) and the base it came from is kept in `split/base/`: made there from
[data].val, test and split_seed like any run's split, or copied there from
[data].base_split (a split written before, e.g. by a plain run). split.json records the
base's csv_sha256, K, the fold and the seed (`splits.FoldRecord`).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import structlog

from fractured.training.datasets.base import DatasetError, SampleSet
from fractured.training.dedup import DEFAULT_THRESHOLD
from fractured.training.splits import (
    CSV_NAME,
    JSON_NAME,
    FoldRecord,
    Split,
    load_split,
    place_groups,
    read_written,
    split_for,
    write_split,
)

#: The base split's folder inside a fold run's split folder.
BASE_DIR = "base"

log = structlog.get_logger()


def fold_of(base: Split, *, k: int, seed: int) -> dict[str, int]:
    """The fold (0..k-1) of every train and val image of `base` (relative path -> fold).

    Whole groups are placed, stratified by (label, body part), each fold getting 1/k of
    every stratum. A DatasetError when train+val has fewer groups than folds.
    """
    pool = [entry for entry in base.entries if entry.split != "test"]
    groups = len({entry.group for entry in pool})
    if groups < k:
        raise DatasetError(f"[data].folds: {k} folds need at least {k} groups of related "
                           f"images in the train and val parts; there are {groups}")
    names = [str(fold) for fold in range(k)]
    placed = place_groups([(entry.label, entry.body_part) for entry in pool],
                          [entry.group for entry in pool], dict.fromkeys(names, 1.0 / k),
                          seed, ties_by_size=True)
    return {entry.path: int(name) for entry, name in zip(pool, placed, strict=True)}


def make_fold_split(base: Split, base_csv_sha256: str, *, k: int, fold: int,
                    seed: int) -> Split:
    """Fold `fold` of `k` of `base` as a split: that fold is "val", the other folds
    "train", and the test part the base's. `base_csv_sha256` names the base (its
    split.json's csv_sha256) in the record."""
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0..{k - 1}, got {fold}")
    folds = fold_of(base, k=k, seed=seed)
    entries = tuple(
        entry if entry.split == "test" else dataclasses.replace(
            entry, split="val" if folds[entry.path] == fold else "train")
        for entry in base.entries)
    return dataclasses.replace(
        base, entries=entries, created=datetime.now(UTC).isoformat(timespec="seconds"),
        folds=FoldRecord(base_csv_sha256=base_csv_sha256, k=k, fold=fold, seed=seed))


def fold_split_for(sample_set: SampleSet, directory: str | Path, *, folds: int, fold: int,
                   seed: int, base_split: Path | None = None, val: float = 0.15,
                   test: float = 0.15, duplicate_threshold: int = DEFAULT_THRESHOLD,
                   hashes: np.ndarray | None = None) -> Split:
    """A fold run's split in `directory`: reused when written before for this K, fold and
    seed (a resume), else derived from the base and written, the base kept in
    `directory/base`.

    The base is `base_split` (a folder holding split.csv and split.json), copied byte for
    byte; or, without one, the split `split_for` makes (or reuses) in `directory/base`
    from `val`, `test`, `seed` and `duplicate_threshold` (and `hashes`, as split_for
    takes them). A split in `directory` that is
    not this fold (another K, fold or seed, or no fold split at all: a base copied where
    the fold split belongs) is an error naming the [data] key, never replaced.
    """
    directory = Path(directory)
    if (directory / JSON_NAME).exists():
        split = load_split(directory, sample_set)
        _check_same_fold(directory, split.folds, k=folds, fold=fold, seed=seed)
        log.info("split.fold_reused", directory=str(directory), k=folds, fold=fold, seed=seed)
        return split
    base_dir = directory / BASE_DIR
    if base_split is not None:
        _adopt_base(Path(base_split), base_dir)
        base = load_split(base_dir, sample_set)
    else:
        base = split_for(sample_set, base_dir, val=val, test=test, seed=seed,
                         duplicate_threshold=duplicate_threshold, hashes=hashes)
    base_sha = read_written(base_dir)[0]["csv_sha256"]
    split = make_fold_split(base, base_sha, k=folds, fold=fold, seed=seed)
    write_split(split, directory)
    images = split.summary()["images"]
    log.info("split.fold_written", directory=str(directory), k=folds, fold=fold, seed=seed,
             base_csv_sha256=base_sha, images=images)
    return split


def _check_same_fold(directory: Path, record: FoldRecord | None, *, k: int, fold: int,
                     seed: int) -> None:
    if record is None:
        raise DatasetError(f"{directory} holds a split that is not a fold split, and "
                           "[data].folds asks for one: give that split as [data].base_split "
                           "(the fold split is derived from it and written here), or train "
                           "with [data].folds = 0 to use it as it is")
    for key, have, wanted in (("[data].folds", record.k, k), ("[data].fold", record.fold, fold),
                              ("[data].split_seed", record.seed, seed)):
        if have != wanted:
            raise DatasetError(f"{directory} holds {record.describe()}; {key} asks for "
                               f"{wanted} instead of {have}. A run keeps its fold: start "
                               "another run directory for another fold")


def _adopt_base(source: Path, base_dir: Path) -> None:
    """Copy the given base split into the run (split.csv first, split.json last, so a
    folder with split.json holds a whole split); when a base is there already (a run
    stopped before its fold split was written) it must be the same one."""
    wanted = read_written(source)[0]["csv_sha256"]
    if (base_dir / JSON_NAME).exists():
        have = read_written(base_dir)[0]["csv_sha256"]
        if have != wanted:
            raise DatasetError(f"[data].base_split: {source} is another split than the base "
                               f"already in {base_dir} (csv_sha256 {wanted[:12]} against "
                               f"{have[:12]}); start another run directory")
        return
    base_dir.mkdir(parents=True, exist_ok=True)
    for name in (CSV_NAME, JSON_NAME):
        partial = base_dir / f"{name}.partial"
        shutil.copyfile(source / name, partial)
        os.replace(partial, base_dir / name)
    log.info("split.base_copied", source=str(source), directory=str(base_dir),
             csv_sha256=wanted)
