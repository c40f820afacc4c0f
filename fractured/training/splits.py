"""Leakage-safe train/val/test splits: made once per dataset, written beside it, reused.

A score means something only if no test image has a twin in training: the same patient,
the same study, or a flipped/cropped/re-exposed copy of the same radiograph. Samples
are joined into groups by all three (near-duplicates from `dedup`), and whole groups
are placed, stratified by (label, body part) so each split sees the same mix. A dataset
that ships its own split keeps it (results stay comparable with published ones), and
groups crossing it are reported as leakage rather than silently repaired.

The split is deterministic for a seed, and it is written to disk (split.csv, split.json)
and read back for every later run: a split that a model was trained on must never be
remade differently or overwritten, and a dataset that changed underneath it (images
added, removed, relabelled) is refused with the difference named.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fractured.durable import write_durably
from fractured.training.datasets.base import SPLITS, DatasetError, Sample, SampleSet
from fractured.training.dedup import (
    DEFAULT_THRESHOLD,
    duplicate_groups,
    image_hashes,
    readable,
)

#: Version of the split.csv/split.json layout; bump when it changes.
FORMAT_VERSION = 1
CSV_NAME = "split.csv"
JSON_NAME = "split.json"
CSV_COLUMNS = ("relative_path", "split", "group", "label", "body_part")
#: How many names an error message lists before "...".
_SHOWN = 5

log = structlog.get_logger()


@dataclass(frozen=True)
class SplitParameters:
    """What decides a made split; a written split is reused only for the same values."""

    seed: int = 0
    val: float = 0.15
    test: float = 0.15
    duplicate_threshold: int = DEFAULT_THRESHOLD

    def __post_init__(self) -> None:
        if not (0.0 <= self.val < 1.0 and 0.0 <= self.test < 1.0 and self.val + self.test < 1.0):
            raise ValueError(f"val ({self.val}) and test ({self.test}) must be fractions in "
                             "[0, 1) that leave some images for training")
        if not 0 <= self.duplicate_threshold <= 64:
            raise ValueError(f"duplicate_threshold must be a Hamming distance in 0..64, "
                             f"got {self.duplicate_threshold}")

    @property
    def fractions(self) -> dict[str, float]:
        return {"train": 1.0 - self.val - self.test, "val": self.val, "test": self.test}

    def describe(self) -> str:
        return (f"seed={self.seed}, val={self.val}, test={self.test}, "
                f"duplicate_threshold={self.duplicate_threshold}")


@dataclass(frozen=True)
class SplitEntry:
    """One image's place: `path` is relative to the dataset root (POSIX), `group` the
    leakage group it moves with."""

    path: str
    split: str
    group: int
    label: int
    body_part: str


@dataclass(frozen=True)
class FoldRecord:
    """Which fold of which base split a fold split is (training.folds): the base split's
    csv_sha256, the number of folds `k`, this split's validation fold, and the seed that
    dealt the folds. Runs with the same base, k and seed hold disjoint validation folds."""

    base_csv_sha256: str
    k: int
    fold: int
    seed: int

    def describe(self) -> str:
        return f"fold {self.fold} of {self.k} (seed {self.seed}, base split " \
               f"{self.base_csv_sha256[:12]})"


@dataclass(frozen=True)
class Split:
    """A split of one dataset. `shipped` when the dataset's own split was kept.

    `entries` follow the dataset's sample order; `duplicate_groups` are the near-duplicate
    groups (relative paths) found at the parameters' threshold; `unreadable` the images
    that could not be decoded, so were not checked for duplicates (the training loader
    leaves them out too). `folds` says which fold of a base split this is, for a split
    `training.folds` derived (its parameters, duplicates and test part are the base's).
    """

    entries: tuple[SplitEntry, ...]
    parameters: SplitParameters
    shipped: bool
    duplicate_groups: tuple[tuple[str, ...], ...]
    unreadable: tuple[str, ...]
    dataset_format: str
    created: str
    folds: FoldRecord | None = None

    @property
    def assignment(self) -> dict[str, str]:
        """Relative path -> "train" / "val" / "test"."""
        return {entry.path: entry.split for entry in self.entries}

    @property
    def groups(self) -> dict[str, int]:
        """Relative path -> leakage group id (same patient, study or near-duplicate)."""
        return {entry.path: entry.group for entry in self.entries}

    def cross_split_groups(self) -> list[list[str]]:
        """Leakage groups whose images sit in more than one split (none in a made split)."""
        members: dict[int, list[SplitEntry]] = {}
        for entry in self.entries:
            members.setdefault(entry.group, []).append(entry)
        return [[entry.path for entry in group] for group in members.values()
                if len({entry.split for entry in group}) > 1]

    def summary(self) -> dict[str, Any]:
        """Counts per split x label x body part, duplicates, and leakage across splits."""
        counts: dict[str, dict[str, dict[str, int]]] = {name: {} for name in SPLITS}
        for entry in self.entries:
            per_label = counts[entry.split].setdefault(str(entry.label), {})
            part = entry.body_part or "unknown"
            per_label[part] = per_label.get(part, 0) + 1
        crossing = self.cross_split_groups()
        crossing_images = sum(len(group) for group in crossing)
        warning = None
        if crossing:
            warning = (f"{len(crossing)} groups of the same patient, study or near-duplicate "
                       f"images ({crossing_images} images) cross the dataset's own splits: "
                       "scores on its val/test overstate what a model does on new patients")
        return {
            "source": "shipped" if self.shipped else "made",
            "dataset_format": self.dataset_format,
            "parameters": asdict(self.parameters),
            "samples": len(self.entries),
            "images": {name: sum(entry.split == name for entry in self.entries)
                       for name in SPLITS},
            "counts": counts,
            "duplicate_groups": len(self.duplicate_groups),
            "duplicate_images": sum(len(group) for group in self.duplicate_groups),
            "unreadable_images": len(self.unreadable),
            "cross_split_groups": len(crossing),
            "cross_split_images": crossing_images,
            "warning": warning,
            "folds": asdict(self.folds) if self.folds else None,
        }

    def samples(self, sample_set: SampleSet, name: str) -> list[Sample]:
        """The samples of split `name`, in dataset order."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        assignment = self.assignment
        chosen = []
        for sample in sample_set.samples:
            path = relative_path(sample_set, sample)
            if path not in assignment:
                raise DatasetError(f"{path} is not in this split: the dataset changed since "
                                   "it was made (load_split names what changed)")
            if assignment[path] == name:
                chosen.append(sample)
        return chosen


def relative_path(sample_set: SampleSet, sample: Sample) -> str:
    """The key a split uses for a sample: its path under the dataset root, POSIX style,
    so a split stays valid when the dataset moves; a path outside the root is kept whole."""
    try:
        return sample.path.relative_to(sample_set.root).as_posix()
    except ValueError:
        return sample.path.as_posix()


def make_split(sample_set: SampleSet, *, val: float = 0.15, test: float = 0.15, seed: int = 0,
               duplicate_threshold: int = DEFAULT_THRESHOLD,
               hashes: np.ndarray | None = None) -> Split:
    """Split a dataset with no group of related images on two sides.

    Groups are the union of same patient, same study and near-duplicates (`hashes` from
    `dedup.image_hashes`, computed here when not given; images that cannot be decoded
    are logged, listed in the split, and placed as groups of their own). When every
    sample carries the dataset's own split, that split is kept and groups crossing it
    are reported in the summary's warning; when only some do, the dataset is refused
    (half a shipped split cannot be completed without guessing). Otherwise whole groups
    are placed, largest first (in seed-shuffled order among equal sizes), each in the
    split whose per-stratum (label, body part) count is furthest below its target. A
    fraction of 0 leaves that split empty.
    """
    parameters = SplitParameters(seed, val, test, duplicate_threshold)
    samples = sample_set.samples
    if not samples:
        raise DatasetError(f"{sample_set.root}: no samples to split")
    paths = [relative_path(sample_set, sample) for sample in samples]
    repeated = [path for path, count in Counter(paths).items() if count > 1]
    if repeated:
        raise DatasetError(f"{sample_set.root}: {len(repeated)} images are listed more than "
                           f"once ({_names(repeated)}); a split needs one label per image")
    shipped = [sample.split for sample in samples]
    with_split = sum(split is not None for split in shipped)
    if 0 < with_split < len(samples):
        raise DatasetError(f"{sample_set.root}: {with_split} of {len(samples)} images carry a "
                           "split of the dataset's own and the rest none; give every image "
                           "one, or none to have a split made")
    if hashes is None:
        hashes = image_hashes([sample.path for sample in samples], unreadable={})
    if len(hashes) != len(samples):
        raise ValueError(f"{len(hashes)} hashes for {len(samples)} samples")
    hashed = set(readable(hashes).tolist())
    unreadable = tuple(path for index, path in enumerate(paths) if index not in hashed)
    if unreadable:
        log.warning("split.unreadable_images", count=len(unreadable),
                    first=list(unreadable[:_SHOWN]))
    near = duplicate_groups(hashes, duplicate_threshold)
    group_of = _leakage_groups(samples, near)
    if with_split:
        assigned: list[str] = [str(split) for split in shipped]
    else:
        assigned = place_groups([(sample.label, sample.body_part) for sample in samples],
                                group_of, parameters.fractions, parameters.seed)
    split = Split(
        entries=tuple(SplitEntry(path, name, group, sample.label, sample.body_part)
                      for path, name, group, sample in zip(paths, assigned, group_of, samples,
                                                           strict=True)),
        parameters=parameters,
        shipped=bool(with_split),
        duplicate_groups=tuple(tuple(paths[i] for i in group) for group in near),
        unreadable=unreadable,
        dataset_format=sample_set.format,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    summary = split.summary()
    log.info("split.made", source=summary["source"], images=summary["images"],
             duplicate_groups=summary["duplicate_groups"], **asdict(parameters))
    if summary["warning"]:
        log.warning("split.leakage", cross_split_groups=summary["cross_split_groups"],
                    cross_split_images=summary["cross_split_images"])
    return split


def _leakage_groups(samples: Sequence[Sample], near: list[list[int]]) -> list[int]:
    """A group id per sample: same non-empty patient, same non-empty study, or one
    near-duplicate group, joined transitively; ids numbered by first member."""
    parent = list(range(len(samples)))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def join(a: int, b: int) -> None:
        a, b = root(a), root(b)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first: dict[tuple[str, str], int] = {}
    for index, sample in enumerate(samples):
        for key in (("patient", sample.patient), ("study", sample.study)):
            if key[1]:
                join(first.setdefault(key, index), index)
    for group in near:
        for member in group[1:]:
            join(group[0], member)
    ids: dict[int, int] = {}
    return [ids.setdefault(root(index), len(ids)) for index in range(len(samples))]


def place_groups(strata: Sequence[tuple[int, str]], group_of: Sequence[int],
                 fractions: Mapping[str, float], seed: int, *,
                 ties_by_size: bool = False) -> list[str]:
    """A part name per sample, placing whole groups so each part gets its fraction of
    every stratum (label, body part): a split's train/val/test, or the K folds that
    `training.folds` deals a split's train and val into.

    Groups are placed largest first (in seed-shuffled order among equal sizes), each in
    the part whose per-stratum count is furthest below its target. Ties go to the part
    named first, or with `ties_by_size` to the part furthest below its share of all
    images: equal folds tie on every stratum none of them holds yet, and the first fold
    would take the first group of each (make_split keeps the first rule, so a seed still
    makes the split it made before). A fraction of 0 leaves that part empty.
    """
    totals = Counter(strata)
    target = {name: {stratum: share * count for stratum, count in totals.items()}
              for name, share in fractions.items()}
    placed: dict[str, Counter[tuple[int, str]]] = {name: Counter() for name in fractions}
    sizes = dict.fromkeys(fractions, 0)
    members: dict[int, list[int]] = {}
    for index, group in enumerate(group_of):
        members.setdefault(group, []).append(index)
    keys = list(members)
    shuffled = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    shuffled.sort(key=lambda group: -len(members[group]))  # stable: seed order within a size
    assigned = [""] * len(strata)
    for group in shuffled:
        need = Counter(strata[index] for index in members[group])

        def deficit(name: str, need: Counter[tuple[int, str]] = need) -> tuple[float, float]:
            own = sum(count * (target[name][stratum] - placed[name][stratum])
                      for stratum, count in need.items())
            return own, fractions[name] * len(strata) - sizes[name] if ties_by_size else 0.0

        # The deficits of all parts add up to what of the group's strata is still
        # unplaced, so one is positive; a part with fraction 0 stays at 0, never chosen.
        chosen = max(fractions, key=deficit)
        placed[chosen].update(need)
        sizes[chosen] += len(members[group])
        for index in members[group]:
            assigned[index] = chosen
    return assigned


def _fingerprint(labels: dict[str, int]) -> str:
    """sha256 over the sorted relative paths and their labels: what a split depends on."""
    digest = hashlib.sha256()
    for path in sorted(labels):
        digest.update(f"{path}\t{labels[path]}\n".encode())
    return digest.hexdigest()


def _csv_text(split: Split) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for entry in split.entries:
        writer.writerow((entry.path, entry.split, entry.group, entry.label, entry.body_part))
    return buffer.getvalue()


def write_split(split: Split, directory: str | Path) -> Path:
    """Write `split.csv` and `split.json` into `directory`; returns the JSON's path.

    Refuses (FileExistsError) to replace an existing split: a model may have been
    trained on it. The CSV is written first and the JSON last, each by rename, so a
    directory with a split.json always holds a complete split.
    """
    directory = Path(directory)
    json_path, csv_path = directory / JSON_NAME, directory / CSV_NAME
    if json_path.exists():
        raise FileExistsError(f"{json_path} exists: a split is never overwritten (a model "
                              "may have been trained on it); choose another directory")
    directory.mkdir(parents=True, exist_ok=True)
    text = _csv_text(split)
    meta = {
        "version": FORMAT_VERSION,
        "format": split.dataset_format,
        "source": "shipped" if split.shipped else "made",
        **asdict(split.parameters),
        "samples": len(split.entries),
        "sha256": _fingerprint({entry.path: entry.label for entry in split.entries}),
        "csv_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "created": split.created,
        "duplicate_groups": [list(group) for group in split.duplicate_groups],
        "unreadable": list(split.unreadable),
    }
    if split.folds is not None:
        meta["folds"] = asdict(split.folds)
    write_durably(csv_path, text.encode(), mode=0o644)
    write_durably(json_path, (json.dumps(meta, indent=2) + "\n").encode(), mode=0o644)
    return json_path




def _read_meta(directory: Path) -> dict[str, Any]:
    json_path = directory / JSON_NAME
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"{json_path}: no split written here") from exc
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{json_path}: not valid JSON ({exc})") from exc
    if meta.get("version") != FORMAT_VERSION:
        raise DatasetError(f"{json_path}: split format version {meta.get('version')!r}, "
                           f"this version reads {FORMAT_VERSION}")
    return meta


def _parameters(meta: dict[str, Any]) -> SplitParameters:
    return SplitParameters(seed=meta["seed"], val=meta["val"], test=meta["test"],
                           duplicate_threshold=meta["duplicate_threshold"])


def read_written(directory: str | Path) -> tuple[dict[str, Any], dict[str, SplitEntry]]:
    """A written split's split.json record and its entries by relative path, the CSV
    checked against the record's sha256. Needs no data set: what compares splits by
    their files (`fractured cv`) reads them so, and `load_split` checks the data too."""
    directory = Path(directory)
    meta = _read_meta(directory)
    csv_path = directory / CSV_NAME
    try:
        text = csv_path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetError(f"{csv_path}: missing beside {JSON_NAME}") from exc
    if hashlib.sha256(text.encode()).hexdigest() != meta["csv_sha256"]:
        raise DatasetError(f"{csv_path} was edited after it was written (its sha256 differs "
                           f"from the one in {JSON_NAME}); make a new split instead")
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise DatasetError(f"{csv_path}: columns {reader.fieldnames}, expected {CSV_COLUMNS}")
    written = {row["relative_path"]: SplitEntry(row["relative_path"], row["split"],
                                                int(row["group"]), int(row["label"]),
                                                row["body_part"])
               for row in reader}
    return meta, written


def load_split(directory: str | Path, sample_set: SampleSet) -> Split:
    """Read a written split back, refusing it when the dataset is not the one it split.

    The DatasetError says how many images were added, are missing or changed label
    since, with the first few names: training on a changed dataset with an old split
    would silently put new images nowhere, or compare models on different test sets.
    """
    directory = Path(directory)
    meta, written = read_written(directory)
    current = {relative_path(sample_set, sample): sample.label for sample in sample_set.samples}
    _check_unchanged(directory, {path: entry.label for path, entry in written.items()}, current)
    return Split(
        entries=tuple(written[path] for path in current),
        parameters=_parameters(meta),
        shipped=meta["source"] == "shipped",
        duplicate_groups=tuple(tuple(group) for group in meta["duplicate_groups"]),
        unreadable=tuple(meta["unreadable"]),
        dataset_format=meta["format"],
        created=meta["created"],
        folds=FoldRecord(**meta["folds"]) if "folds" in meta else None,
    )


def _check_unchanged(directory: Path, written: dict[str, int], current: dict[str, int]) -> None:
    if _fingerprint(written) == _fingerprint(current):
        return
    added = sorted(current.keys() - written.keys())
    missing = sorted(written.keys() - current.keys())
    relabelled = sorted(path for path in current.keys() & written.keys()
                        if current[path] != written[path])
    changes = [f"{len(paths)} {what} ({_names(paths)})"
               for what, paths in (("added", added), ("missing", missing),
                                   ("relabelled", relabelled)) if paths]
    raise DatasetError(f"{directory}: the dataset changed since this split was written: "
                       f"{'; '.join(changes)} images. Make a new split in another directory "
                       "(models trained on this one were trained on the old dataset)")


def _names(paths: Sequence[str]) -> str:
    shown = ", ".join(paths[:_SHOWN])
    return shown + (", ..." if len(paths) > _SHOWN else "")


def split_for(sample_set: SampleSet, directory: str | Path, *, val: float = 0.15,
              test: float = 0.15, seed: int = 0,
              duplicate_threshold: int = DEFAULT_THRESHOLD,
              hashes: np.ndarray | None = None) -> Split:
    """The split in `directory` if one was written with these parameters, else a new one
    made and written there.

    A split written with other parameters is an error, never replaced: retraining on a
    different split would make the old model's scores incomparable, and the split a
    model was trained on must stay on disk beside it.
    """
    directory = Path(directory)
    wanted = SplitParameters(seed, val, test, duplicate_threshold)
    if (directory / JSON_NAME).exists():
        have = _parameters(_read_meta(directory))
        if have != wanted:
            raise DatasetError(f"{directory} holds a split made with {have.describe()}; asked "
                               f"for {wanted.describe()}. Choose another directory, or delete "
                               "this one if no model was trained on it")
        split = load_split(directory, sample_set)
        log.info("split.reused", directory=str(directory), created=split.created,
                 **asdict(have))
        return split
    split = make_split(sample_set, val=val, test=test, seed=seed,
                       duplicate_threshold=duplicate_threshold, hashes=hashes)
    write_split(split, directory)
    log.info("split.written", directory=str(directory), samples=len(split.entries))
    return split
