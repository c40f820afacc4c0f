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
    """Runs that are not folds of one recipe and one partition; the message names the run
    and what differs."""


@dataclass(frozen=True)
class FoldRun:
    """A fold run as its files describe it."""

    run: Path
    record: FoldRecord
    settings: config.TrainSettings

    @property
    def name(self) -> str:
        return str(self.run)


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


def check_folds_of_one_recipe(runs: Sequence[FoldRun]) -> None:
    """Refuse runs of other partitions (base split, K, fold seed), a fold given twice,
    and runs whose settings differ beyond [data].fold and [run]."""
    first = runs[0]
    seen: dict[int, FoldRun] = {}
    for run in runs:
        for what, have, wanted in (
                ("base split (csv_sha256)", run.record.base_csv_sha256,
                 first.record.base_csv_sha256),
                ("number of folds ([data].folds)", run.record.k, first.record.k),
                ("fold seed ([data].split_seed, else [run].seed)", run.record.seed,
                 first.record.seed)):
            if have != wanted:
                raise CrossValidationError(f"{run.name}: {what} {have} but {first.name} has "
                                           f"{wanted}: not folds of one base split and K")
        if run.record.fold in seen:
            raise CrossValidationError(f"{run.name} and {seen[run.record.fold].name} are both "
                                       f"fold {run.record.fold}: give each fold once")
        seen[run.record.fold] = run
        changed = recipe_differences(dataclasses.asdict(first.settings),
                                     dataclasses.asdict(run.settings))
        if changed:
            raise CrossValidationError(f"{run.name}: {', '.join(changed)} differ from "
                                       f"{first.name}'s: not one recipe")


def recipe_differences(first: Mapping[str, Mapping[str, Any]],
                       other: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The `[section].key`s whose values differ, leaving out what folds of one recipe
    may differ in."""
    return [f"[{section}].{key}" for section, values in first.items()
            if section not in _FREE_SECTIONS
            for key, value in values.items()
            if (section, key) not in _FREE_KEYS and other[section][key] != value]


def cross_validate(runs: Sequence[Path], out_dir: Path, *, bootstrap: int = 1000,
                   device: str = "auto") -> dict[str, Any]:
    """Check, score and report the fold runs `runs`; returns cv.json's record."""
    folds = [read_fold_run(run) for run in runs]
    check_folds_of_one_recipe(folds)
    runner = Device.choose(device, amp=False, channels_last=False)
    scored: list[FoldScores] = []
    unreadable: list[dict[str, Any]] = []
    limited = False
    rows: list[tuple[int, str, str, str, int, float]] = []
    for fold in sorted(folds, key=lambda run: run.record.fold):
        best = fold.run / "classifier" / checkpoint.BEST
        if not best.is_file():
            raise CrossValidationError(f"{fold.name}: no classifier/{checkpoint.BEST} (has "
                                       "the fold been trained?)")
        state = checkpoint.load(best, "classifier")
        limited = limited or bool(state.get("limited"))
        samples, _ = samples_to_score(fold.run, fold.settings, {"classifier": state}, "val",
                                      None)
        scores = score_classifier(state, samples, runner)
        images = scores.images.samples
        scored.append(FoldScores(fold.record.fold, fold.name, scores.labels, scores.prob,
                                 [sample.body_part for sample in images]))
        unreadable += [{"fold": fold.record.fold, "path": path, "reason": reason}
                       for path, reason in scores.images.unreadable]
        rows += [(fold.record.fold, fold.name, str(sample.path), sample.body_part, int(label),
                  float(p)) for sample, label, p in zip(images, scores.labels, scores.prob,
                                                        strict=True)]
        log.info("cv.fold_scored", run=fold.name, fold=fold.record.fold, images=len(images))
    first = folds[0].record
    record = {
        "title": "Cross-validation" + (" (SMOKE RUNS on a [data].limit subset)"
                                       if limited else ""),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_csv_sha256": first.base_csv_sha256, "seed": first.seed, "limited": limited,
        **cross_validation_metrics(scored, k=first.k, bootstrap=bootstrap),
        "unreadable": unreadable,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CV_JSON).write_text(json.dumps(jsonable(record), indent=2, allow_nan=False)
                                   + "\n", encoding="utf-8")
    (out_dir / CV_MARKDOWN).write_text(markdown(record), encoding="utf-8")
    _write_predictions(out_dir / PREDICTIONS_FILE, rows)
    log.info("cv.done", out=str(out_dir), coverage=record["coverage"],
             pooled_auc=record["pooled"]["roc_auc"])
    return record


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


def _write_predictions(path: Path, rows: Sequence[tuple[int, str, str, str, int, float]]) -> None:
    """Every out-of-fold score: fold, run, image, body part, label, probability."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["fold", "run", "image", "body_part", "label", "probability"])
        for fold, run, image, part, label, p in rows:
            writer.writerow([fold, run, image, part, label, f"{p:.6f}"])


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _interval(bounds: Sequence[float] | None) -> str:
    return "-" if bounds is None else f"{bounds[0]:.3f}-{bounds[1]:.3f}"
