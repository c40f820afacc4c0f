"""`fractured cv`: the cross-validation report of the fold runs of one recipe.

Each fold run ([data].folds = K, [data].fold = 0..K-1, see training.folds) trained on
K - 1 folds of one base split and chose and calibrated its model on the remaining one.
Here each run's classifier/best.pt scores its own validation fold, by the code
`fractured evaluate --split val` scores with (`evaluate.score_classifier`), and the
scores are reported per fold and pooled (`evaluation.cross_validation`): cv.json,
cv.md and predictions.csv (every out-of-fold score, for analysis).

The pooled numbers mean something only if the runs really are the folds of one
partition and one recipe, so that is checked from their files before anything is
scored: the same base split (its csv_sha256, however [data].base_split pointed at it),
K and fold seed, each fold at most once, the same settings except [data].fold and [run]
(where and how fast it ran), and a test part identical to the base's. Missing folds are
allowed and said ("3 of 5 folds"). Only validation folds are scored: the test part is
never read.

Folds trained on different machines (or over several sessions whose run directories do
not outlive them) are scored where they ran and merged later: `--merge` takes earlier
reports, whose cv.json records the partition and the recipe and whose predictions.csv
holds every score (exact digits), checks them like runs, and pools them with
any runs given. Merging the reports of disjoint folds gives the numbers one `fractured
cv` over all their runs gives.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fractured.training import checkpoint, config
from fractured.training.evaluate import samples_to_score, score_classifier
from fractured.training.evaluation.cross_validation import (
    FoldScores,
    cross_validation_metrics,
)
from fractured.training.evaluation.report import jsonable
from fractured.training.folds import BASE_DIR
from fractured.training.loops import Device
from fractured.training.run import SETTINGS_FILE, SPLIT_DIR
from fractured.training.splits import FoldRecord, read_written

log = structlog.get_logger()

CV_JSON = "cv.json"
CV_MARKDOWN = "cv.md"
PREDICTIONS_FILE = "predictions.csv"
#: Settings that may differ between the folds of one recipe: the fold itself, [run]
#: (device, workers, precision, seed of the batches), and how the base split was given
#: (a path, or made in the run): the base itself is compared by its csv_sha256.
_FREE_KEYS = {("data", "fold"), ("data", "base_split")}
_FREE_SECTIONS = {"run"}


class CrossValidationError(Exception):
    """Runs or reports that are not folds of one recipe and one partition; the message
    names the run or report and what differs."""


@dataclass(frozen=True)
class FoldSource:
    """What folds of one cross-validation must share, as a fold run or an earlier report
    gives it: the partition (base split, K, fold seed), the folds it holds and the recipe
    (its settings as JSON, [data].fold and [run] included: `recipe_differences` leaves
    them out)."""

    name: str
    base_csv_sha256: str
    k: int
    seed: int
    folds: tuple[int, ...]
    recipe: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class ScoredFold:
    """One fold's out-of-fold scores and the report's rows for it."""

    scores: FoldScores
    rows: list[tuple[int, str, str, str, int, float]]
    unreadable: list[dict[str, Any]]
    limited: bool


@dataclass(frozen=True)
class FoldRun:
    """A fold run as its files describe it."""

    run: Path
    record: FoldRecord
    settings: config.TrainSettings

    @property
    def name(self) -> str:
        return str(self.run)

    @property
    def source(self) -> FoldSource:
        return FoldSource(self.name, self.record.base_csv_sha256, self.record.k,
                          self.record.seed, (self.record.fold,), recipe_of(self.settings))


def recipe_of(settings: config.TrainSettings) -> dict[str, Any]:
    """Settings as cv.json records them, so a run and a report compare alike."""
    recipe: dict[str, Any] = json.loads(json.dumps(jsonable(dataclasses.asdict(settings))))
    return recipe


def read_fold_run(run: Path) -> FoldRun:
    """A run's settings and fold record, refused when it is no fold run or its test part
    is not its base split's."""
    if not (run / SETTINGS_FILE).is_file():
        raise CrossValidationError(f"{run}: no {SETTINGS_FILE}, so no training run")
    settings = config.load(run / SETTINGS_FILE, saved_run=True)
    meta, entries = read_written(run / SPLIT_DIR)
    if "folds" not in meta:
        raise CrossValidationError(f"{run}: not a fold run (its split has no folds record; "
                                   "it was trained with [data].folds = 0)")
    record = FoldRecord(**meta["folds"])
    if (settings.data.folds, settings.data.fold) != (record.k, record.fold):
        raise CrossValidationError(
            f"{run}: its {SETTINGS_FILE} says fold {settings.data.fold} of "
            f"{settings.data.folds} ([data].fold, [data].folds) but its split is "
            f"{record.describe()}")
    base_meta, base_entries = read_written(run / SPLIT_DIR / BASE_DIR)
    if base_meta["csv_sha256"] != record.base_csv_sha256:
        raise CrossValidationError(f"{run}: {SPLIT_DIR}/{BASE_DIR} is not the base split "
                                   f"its fold split was derived from")
    test = {path for path, entry in entries.items() if entry.split == "test"}
    base_test = {path for path, entry in base_entries.items() if entry.split == "test"}
    if test != base_test or entries.keys() != base_entries.keys():
        raise CrossValidationError(
            f"{run}: its test part is not its base split's ({len(test ^ base_test)} images "
            f"differ): its validation scores cannot be pooled with folds that held out "
            "the base's test images")
    return FoldRun(run, record, settings)


def check_folds_of_one_recipe(sources: Sequence[FoldSource]) -> None:
    """Refuse runs or reports of other partitions (base split, K, fold seed), a fold given
    twice, and settings that differ beyond [data].fold and [run]."""
    first = sources[0]
    seen: dict[int, FoldSource] = {}
    for source in sources:
        for what, have, wanted in (
                ("base split (csv_sha256)", source.base_csv_sha256, first.base_csv_sha256),
                ("number of folds ([data].folds)", source.k, first.k),
                ("fold seed ([data].split_seed, else [run].seed)", source.seed, first.seed)):
            if have != wanted:
                raise CrossValidationError(f"{source.name}: {what} {have} but {first.name} "
                                           f"has {wanted}: not folds of one base split and K")
        for fold in source.folds:
            if fold in seen:
                raise CrossValidationError(f"{source.name} and {seen[fold].name} are both "
                                           f"fold {fold}: give each fold once")
            seen[fold] = source
        changed = recipe_differences(first.recipe, source.recipe)
        if changed:
            raise CrossValidationError(f"{source.name}: {', '.join(changed)} differ from "
                                       f"{first.name}'s: not one recipe")


def recipe_differences(first: Mapping[str, Mapping[str, Any]],
                       other: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The `[section].key`s whose values differ, leaving out what folds of one recipe
    may differ in."""
    return [f"[{section}].{key}" for section, values in first.items()
            if section not in _FREE_SECTIONS
            for key, value in values.items()
            if (section, key) not in _FREE_KEYS and other[section][key] != value]


def cross_validate(runs: Sequence[Path], out_dir: Path, *, merge: Sequence[Path] = (),
                   bootstrap: int = 1000, device: str = "auto") -> dict[str, Any]:
    """Check and score the fold runs `runs`, pool them with the reports `merge`, and report
    all (cv.json, cv.md, predictions.csv in `out_dir`); returns cv.json's record."""
    if not runs and not merge:
        raise CrossValidationError("no fold runs and no reports to merge")
    folds = [read_fold_run(run) for run in runs]
    reports = [read_report(report) for report in merge]
    check_folds_of_one_recipe([fold.source for fold in folds]
                              + [source for source, _ in reports])
    scored = [scored for _, merged in reports for scored in merged]
    if folds:
        runner = Device.choose(device, amp=False, channels_last=False)
        scored += [score_fold(fold, runner)
                   for fold in sorted(folds, key=lambda run: run.record.fold)]
    first = folds[0].source if folds else reports[0][0]
    scored.sort(key=lambda fold: fold.scores.fold)
    limited = any(fold.limited for fold in scored)
    record = {
        "title": "Cross-validation" + (" (SMOKE RUNS on a [data].limit subset)"
                                       if limited else ""),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_csv_sha256": first.base_csv_sha256, "seed": first.seed, "limited": limited,
        "recipe": first.recipe, "merged": [str(report) for report in merge],
        **cross_validation_metrics([fold.scores for fold in scored], k=first.k,
                                   bootstrap=bootstrap),
        "unreadable": [entry for fold in scored for entry in fold.unreadable],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_predictions(out_dir / PREDICTIONS_FILE, [row for fold in scored for row in fold.rows])
    (out_dir / CV_MARKDOWN).write_text(markdown(record), encoding="utf-8")
    # cv.json last: a report with one is whole (runs.sh skips a fold that has it)
    (out_dir / CV_JSON).write_text(json.dumps(jsonable(record), indent=2, allow_nan=False)
                                   + "\n", encoding="utf-8")
    log.info("cv.done", out=str(out_dir), coverage=record["coverage"],
             pooled_auc=record["pooled"]["roc_auc"])
    return record


def score_fold(fold: FoldRun, runner: Device) -> ScoredFold:
    """The fold run's classifier/best.pt scored on its own validation fold."""
    best = fold.run / "classifier" / checkpoint.BEST
    if not best.is_file():
        raise CrossValidationError(f"{fold.name}: no classifier/{checkpoint.BEST} (has "
                                   "the fold been trained?)")
    state = checkpoint.load(best, "classifier")
    samples, _ = samples_to_score(fold.run, fold.settings, {"classifier": state}, "val", None)
    scores = score_classifier(state, samples, runner)
    images = scores.images.samples
    index = fold.record.fold
    log.info("cv.fold_scored", run=fold.name, fold=index, images=len(images))
    return ScoredFold(
        FoldScores(index, fold.name, scores.labels, scores.prob,
                   [sample.body_part for sample in images]),
        [(index, fold.name, str(sample.path), sample.body_part, int(label), float(p))
         for sample, label, p in zip(images, scores.labels, scores.prob, strict=True)],
        [{"fold": index, "path": path, "reason": reason}
         for path, reason in scores.images.unreadable],
        bool(state.get("limited")))


def read_report(report: Path) -> tuple[FoldSource, list[ScoredFold]]:
    """An earlier `fractured cv` report's partition, recipe and scored folds, refused when
    it lacks what a merge checks."""
    try:
        record = json.loads((report / CV_JSON).read_text(encoding="utf-8"))
        with open(report / PREDICTIONS_FILE, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, ValueError) as exc:
        raise CrossValidationError(f"{report}: not a readable `fractured cv` report "
                                   f"({exc})") from None
    if "recipe" not in record:
        raise CrossValidationError(f"{report}: its {CV_JSON} records no recipe (written "
                                   "before `fractured cv` recorded one): score its runs "
                                   "again instead")
    folds = [row["fold"] for row in record["folds"]]
    by_fold: dict[int, list[dict[str, str]]] = {fold: [] for fold in folds}
    for row in rows:
        if int(row["fold"]) not in by_fold:
            raise CrossValidationError(f"{report}: {PREDICTIONS_FILE} scores fold "
                                       f"{row['fold']}, which its {CV_JSON} does not list")
        by_fold[int(row["fold"])].append(row)
    scored = []
    for fold, fold_rows in by_fold.items():
        if len(fold_rows) != next(row["n"] for row in record["folds"] if row["fold"] == fold):
            raise CrossValidationError(f"{report}: {PREDICTIONS_FILE} and {CV_JSON} count "
                                       f"fold {fold}'s images differently")
        labels = np.array([int(row["label"]) for row in fold_rows])
        prob = np.array([float(row["probability"]) for row in fold_rows])
        parts = [row["body_part"] for row in fold_rows]
        source = fold_rows[0]["run"] if fold_rows else str(report)
        scored.append(ScoredFold(
            FoldScores(fold, source, labels, prob, parts),
            [(fold, row["run"], row["image"], row["body_part"], int(row["label"]),
              float(row["probability"])) for row in fold_rows],
            [entry for entry in record["unreadable"] if entry["fold"] == fold],
            bool(record["limited"])))
    source = FoldSource(str(report), record["base_csv_sha256"], record["k"], record["seed"],
                        tuple(folds), record["recipe"])
    return source, scored


def headline(record: Mapping[str, Any]) -> str:
    """One line: coverage, per-fold AUC mean +- sd, and the pooled AUC with its interval."""
    pooled = record["pooled"]
    spread = (f"fold AUC {_number(record['fold_auc_mean'])} "
              f"± {_number(record['fold_auc_sd'])}")
    return (f"{record['coverage']}: {spread}; pooled out-of-fold AUC "
            f"{_number(pooled['roc_auc'])} (95 % CI {_interval(pooled['roc_auc_ci95'])}) on "
            f"{pooled['n']} images, {pooled['positives']} with fracture")


def markdown(record: Mapping[str, Any]) -> str:
    """cv.md: a row per fold, the mean and the pooled rows, then the pool per body part."""
    lines = [f"# {record['title']}: {record['coverage']}", "",
             f"Base split `{record['base_csv_sha256'][:12]}`, K = {record['k']}, fold seed "
             f"{record['seed']}. Each fold's classifier/best.pt scored on its own validation "
             "fold (the test part is not read); every number is in `cv.json`.", ""]
    if record.get("merged"):
        lines += ["Folds merged from earlier reports (scored where their runs were): "
                  + ", ".join(f"`{report}`" for report in record["merged"]) + ".", ""]
    if record["missing_folds"]:
        lines += [f"Missing folds: {', '.join(map(str, record['missing_folds']))}.", ""]
    if record["unreadable"]:
        lines += [f"{len(record['unreadable'])} validation images could not be decoded and "
                  "were left out (listed in `cv.json`).", ""]
    lines += ["| Fold | Run | Images | Fractures | AUC | 95 % CI |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {row['fold']} | {row['source']} | {row['n']} | {row['positives']} | "
              f"{_number(row['roc_auc'])} | {_interval(row['roc_auc_ci95'])} |"
              for row in record["folds"]]
    lines.append(f"| mean ± sd | | | | {_number(record['fold_auc_mean'])} ± "
                 f"{_number(record['fold_auc_sd'])} | |")
    pooled = record["pooled"]
    lines += [f"| pooled | | {pooled['n']} | {pooled['positives']} | "
              f"{_number(pooled['roc_auc'])} | {_interval(pooled['roc_auc_ci95'])} |", "",
              "## Pooled by body part", "",
              "| Body part | Images | Fractures | AUC | 95 % CI |", "|---|---|---|---|---|"]
    lines += [f"| {part} | {row['n']} | {row['positives']} | {_number(row['roc_auc'])} | "
              f"{_interval(row['roc_auc_ci95'])} |"
              for part, row in record["body_parts"].items()]
    return "\n".join(lines) + "\n"


def write_predictions(path: Path, rows: Sequence[tuple[int, str, str, str, int, float]]) -> None:
    """Every out-of-fold score: fold, run, image, body part, label, probability (its
    shortest exact digits, so that a merge pools the very scores)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fold", "run", "image", "body_part", "label", "probability"])
        for fold, run, image, part, label, p in rows:
            writer.writerow([fold, run, image, part, label, repr(p)])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0]:.3f}-{bounds[1]:.3f}"
