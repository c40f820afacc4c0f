"""K-fold cross-validation: the [data] fold settings, the pooled numbers against
scikit-learn, `fractured cv`'s refusals on fake fold runs, and one real 3-fold run."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from fractured.cli import main
from fractured.config import ConfigError
from fractured.training import checkpoint, config, evaluate
from fractured.training import cv as cv_module
from fractured.training.datasets.base import SampleSet
from fractured.training.evaluation.classification import classification_metrics
from fractured.training.evaluation.cross_validation import FoldScores, cross_validation_metrics
from fractured.training.folds import BASE_DIR, make_fold_split
from fractured.training.splits import Split, make_split, read_written, write_split
from tests.models.test_training import SMOKE_FLAGS, synthetic_yolo
from tests.unit.test_splits import dataset, hashes_for

# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["data.folds=1"], r"\[data\]\.folds: 0 \(off\) or at least 3 folds, got 1"),
    (["data.folds=2"], r"\[data\]\.folds: 0 \(off\) or at least 3 folds, got 2"),
    (["data.folds=-3"], r"\[data\]\.folds: 0 \(off\) or at least 3"),
    (["data.folds=5", "data.fold=5"], r"\[data\]\.fold: from 0 to 4 with 5 folds, got 5"),
    (["data.folds=3", "data.fold=-1"], r"\[data\]\.fold: from 0 to 2"),
    (["data.fold=1"], r"\[data\]\.fold: only with \[data\]\.folds"),
    (['data.base_split="runs/a/split"'], r"\[data\]\.base_split: only with \[data\]\.folds"),
])
def test_nonsense_fold_settings_are_refused_naming_the_key(flags: list[str],
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, flags)


def test_fold_settings_load_and_a_resume_may_not_change_them() -> None:
    settings = config.load(None, ["data.folds=5", "data.fold=4"])
    assert (settings.data.folds, settings.data.fold) == (5, 4)
    before = dataclasses.asdict(settings)
    other = dataclasses.asdict(config.load(None, ["data.folds=5", "data.fold=3"]))
    assert checkpoint.changed_settings(before, other, "classifier") == ["[data].fold"]
    other = dataclasses.asdict(config.load(None, ["data.folds=4", "data.fold=3"]))
    assert checkpoint.changed_settings(before, other, "classifier") == ["[data].folds",
                                                                         "[data].fold"]


# -- the numbers -----------------------------------------------------------------------------


def fold_scores(fold: int, n: int, offset: float) -> FoldScores:
    """A fold whose model ranks fairly well, its probabilities shifted by `offset`: each
    fold calibrated its own way, so pooling differs from averaging."""
    rng = np.random.default_rng(fold)
    labels = np.array([0, 1] * (n // 2))
    prob = np.clip(0.35 * labels + 0.65 * rng.random(n) * offset, 0, 1)
    parts = rng.choice(["hand", "leg", "hip", ""], size=n).tolist()
    return FoldScores(fold, f"runs/f{fold}", labels, prob, parts)


def test_per_fold_and_pooled_aucs_are_sklearns_on_the_same_arrays() -> None:
    folds = [fold_scores(3, 60, 1.0), fold_scores(0, 80, 0.6), fold_scores(2, 50, 1.4)]
    record = cross_validation_metrics(folds, k=5, bootstrap=200)
    assert record["coverage"] == "3 of 5 folds" and record["missing_folds"] == [1, 4]
    ordered = sorted(folds, key=lambda fold: fold.fold)
    assert [row["fold"] for row in record["folds"]] == [0, 2, 3]
    aucs = []
    for row, fold in zip(record["folds"], ordered, strict=True):
        aucs.append(roc_auc_score(fold.labels, fold.prob))
        assert row["roc_auc"] == pytest.approx(aucs[-1]) and row["source"] == fold.source
        assert (row["n"], row["positives"]) == (len(fold.labels), int(fold.labels.sum()))
        # the AUC and interval `fractured evaluate` reports on the same scores
        same = classification_metrics(fold.labels, fold.prob, threshold=0.5, bootstrap=200)
        assert row["roc_auc_ci95"] == same["roc_auc_ci95"]
    assert record["fold_auc_mean"] == pytest.approx(np.mean(aucs))
    assert record["fold_auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
    labels = np.concatenate([fold.labels for fold in ordered])
    prob = np.concatenate([fold.prob for fold in ordered])
    pooled = record["pooled"]
    assert pooled["roc_auc"] == pytest.approx(roc_auc_score(labels, prob))
    assert abs(pooled["roc_auc"] - record["fold_auc_mean"]) > 0.01  # pooled, not averaged
    assert (pooled["n"], pooled["positives"]) == (190, 95)
    low, high = pooled["roc_auc_ci95"]
    assert low < pooled["roc_auc"] < high
    parts = np.array([part or "unknown" for fold in ordered for part in fold.body_parts])
    assert sorted(record["body_parts"]) == ["hand", "hip", "leg", "unknown"]
    for part, row in record["body_parts"].items():
        mask = parts == part
        assert row["roc_auc"] == pytest.approx(roc_auc_score(labels[mask], prob[mask])), part
        assert (row["n"], row["positives"]) == (int(mask.sum()), int(labels[mask].sum()))
    # the order the folds come in changes nothing
    assert cross_validation_metrics(folds[::-1], k=5, bootstrap=200) == record


def test_a_fold_without_both_classes_has_no_auc_and_is_left_out_of_the_mean() -> None:
    one_class = FoldScores(1, "runs/f1", np.zeros(10, dtype=int), np.linspace(0, 1, 10),
                           ["hand"] * 10)
    good = fold_scores(0, 40, 1.0)
    record = cross_validation_metrics([good, one_class], k=3, bootstrap=0)
    assert record["folds"][1]["roc_auc"] is None and record["folds"][1]["note"]
    assert record["fold_auc_mean"] == pytest.approx(record["folds"][0]["roc_auc"])
    assert record["fold_auc_sd"] is None and record["pooled"]["roc_auc_ci95"] is None
    with pytest.raises(ValueError, match="a fold is given twice"):
        cross_validation_metrics([good, good], k=3)
    with pytest.raises(ValueError, match=r"folds must lie in 0\.\.2"):
        cross_validation_metrics([dataclasses.replace(good, fold=3)], k=3)


# -- `fractured cv` refuses what is not the folds of one recipe ------------------------------


@pytest.fixture
def data(tmp_path: Path) -> SampleSet:
    return dataset(tmp_path / "data")


def fake_run(run: Path, base: Split, *, k: int = 3, fold: int = 0, seed: int = 0,
             flags: tuple[str, ...] = (), split: Split | None = None) -> Path:
    """A fold run's files without a model: train.toml, split/base/ and split/."""
    run.mkdir(parents=True)
    config.save(config.load(None, [f"data.folds={k}", f"data.fold={fold}", *flags]),
                run / "train.toml")
    write_split(base, run / "split" / BASE_DIR)
    sha = read_written(run / "split" / BASE_DIR)[0]["csv_sha256"]
    write_split(split or make_fold_split(base, sha, k=k, fold=fold, seed=seed), run / "split")
    return run


def cv(*runs: Path, out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["cv", *map(str, runs), "--out", str(out)])
    return result.exit_code, result.output


def test_cv_refuses_runs_that_are_not_folds_of_one_recipe(data: SampleSet,
                                                          tmp_path: Path) -> None:
    base = make_split(data, hashes=hashes_for())
    runs = tmp_path / "runs"
    f0, f1 = fake_run(runs / "f0", base), fake_run(runs / "f1", base, fold=1)
    out = tmp_path / "cv"

    plain = runs / "plain"
    plain.mkdir()
    config.save(config.load(None), plain / "train.toml")
    write_split(base, plain / "split")
    code, output = cv(f0, plain, out=out)
    assert code != 0 and f"{plain}: not a fold run" in output

    again = fake_run(runs / "again", base, fold=1)
    code, output = cv(f0, f1, again, out=out)
    assert code != 0 and f"{again} and {f1} are both fold 1" in output

    four = fake_run(runs / "four", base, k=4, fold=2)
    code, output = cv(f0, four, out=out)
    assert code != 0 and f"{four}: number of folds ([data].folds) 4 but {f0} has 3" in output

    other_base = fake_run(runs / "other-base", make_split(data, seed=1, hashes=hashes_for()),
                          fold=2)
    code, output = cv(f0, other_base, out=out)
    assert code != 0 and f"{other_base}: base split (csv_sha256)" in output

    reseeded = fake_run(runs / "reseeded", base, fold=2, seed=1)
    code, output = cv(f0, reseeded, out=out)
    assert code != 0 and f"{reseeded}: fold seed" in output

    recipe = fake_run(runs / "recipe", base, fold=2, flags=("classifier.lr=0.01",
                                                              "augment.hflip=false"))
    code, output = cv(f0, recipe, out=out)
    assert code != 0
    assert f"{recipe}: [augment].hflip, [classifier].lr differ from {f0}'s" in output

    sha = read_written(f0 / "split" / BASE_DIR)[0]["csv_sha256"]
    fold = make_fold_split(base, sha, k=3, fold=2, seed=0)
    moved = next(i for i, entry in enumerate(fold.entries) if entry.split == "test")
    entries = list(fold.entries)
    entries[moved] = dataclasses.replace(entries[moved], split="train")
    leaky = fake_run(runs / "leaky", base, fold=2,
                     split=dataclasses.replace(fold, entries=tuple(entries)))
    code, output = cv(f0, leaky, out=out)
    assert code != 0 and f"{leaky}: its test part is not its base split's (1 images" in output

    # [run] may differ (where and how fast a fold ran): the check passes, and the refusal
    # is the missing model.
    elsewhere = fake_run(runs / "elsewhere", base, fold=2, flags=("run.workers=7",))
    code, output = cv(f0, elsewhere, out=out)
    assert code != 0 and f"{f0}: no classifier/best.pt" in output
    assert not out.exists()


# -- `fractured cv --merge`: folds scored where they ran, pooled later --------------------


def report(out: Path, folds: list[FoldScores], *, k: int = 5, seed: int = 0,
           flags: tuple[str, ...] = (), recipe: bool = True) -> Path:
    """A `fractured cv` report of `folds` as cv.json and predictions.csv hold it."""
    out.mkdir(parents=True)
    record = {"base_csv_sha256": "ab" * 32, "seed": seed, "limited": False, "unreadable": [],
              **cross_validation_metrics(folds, k=k, bootstrap=0)}
    if recipe:
        record["recipe"] = cv_module.recipe_of(config.load(None, [f"data.folds={k}",
                                                                  *flags]))
    (out / "cv.json").write_text(json.dumps(record))
    cv_module.write_predictions(out / "predictions.csv", [
        (fold.fold, fold.source, f"img/{fold.fold}-{i}.jpg", part, int(label), float(p))
        for fold in folds
        for i, (label, p, part) in enumerate(zip(fold.labels, fold.prob, fold.body_parts,
                                                 strict=True))])
    return out


def merge(*reports: Path, out: Path) -> tuple[int, str]:
    flags = [arg for report in reports for arg in ("--merge", str(report))]
    result = CliRunner().invoke(main, ["cv", *flags, "--out", str(out), "--bootstrap", "100"])
    return result.exit_code, result.output


def test_merged_reports_pool_as_one_cv_of_all_their_folds(tmp_path: Path) -> None:
    folds = [fold_scores(fold, 40, 0.6 + 0.2 * fold) for fold in range(5)]
    first = report(tmp_path / "f02", [folds[0], folds[2]])
    rest = report(tmp_path / "f134", [folds[1], folds[3], folds[4]])
    out = tmp_path / "cv"
    code, output = merge(first, rest, out=out)
    assert code == 0, output
    assert "\n5 of 5 folds: fold AUC " in output
    record = json.loads((out / "cv.json").read_text())
    whole = cross_validation_metrics(folds, k=5, bootstrap=100)
    for key in ("folds", "pooled", "body_parts", "fold_auc_mean", "fold_auc_sd", "coverage"):
        assert record[key] == json.loads(json.dumps(whole[key])), key
    assert record["merged"] == [str(first), str(rest)]
    assert record["recipe"] == json.loads((first / "cv.json").read_text())["recipe"]
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["fold"]) for row in rows] == sorted(int(row["fold"]) for row in rows)
    prob = np.array([float(row["probability"]) for row in rows])
    assert np.array_equal(prob, np.concatenate([fold.prob for fold in folds]))  # exact
    assert f"`{first}`, `{rest}`" in (out / "cv.md").read_text()

    # the merged report merges again, as the reports of a run of all five would
    again = tmp_path / "again"
    code, output = merge(out, out=again)
    assert code == 0, output
    assert json.loads((again / "cv.json").read_text())["pooled"] == record["pooled"]


def test_merge_refuses_reports_that_are_not_folds_of_one_recipe(data: SampleSet,
                                                                 tmp_path: Path) -> None:
    folds = [fold_scores(fold, 20, 1.0) for fold in range(3)]
    first = report(tmp_path / "first", folds[:2])
    out = tmp_path / "cv"

    twice = report(tmp_path / "twice", folds[1:])
    code, output = merge(first, twice, out=out)
    assert code != 0 and f"{twice} and {first} are both fold 1" in output

    recipe = report(tmp_path / "recipe", folds[2:], flags=("classifier.lr=0.01",))
    code, output = merge(first, recipe, out=out)
    assert code != 0 and f"{recipe}: [classifier].lr differ from {first}'s" in output

    four = report(tmp_path / "four", [folds[2]], k=4)
    code, output = merge(first, four, out=out)
    assert code != 0 and f"{four}: number of folds ([data].folds) 4 but {first} has 5" in output

    old = report(tmp_path / "old", folds[2:], recipe=False)
    code, output = merge(first, old, out=out)
    assert code != 0 and f"{old}: its cv.json records no recipe" in output

    cut = report(tmp_path / "cut", folds[2:])
    lines = (cut / "predictions.csv").read_text().splitlines(keepends=True)
    (cut / "predictions.csv").write_text("".join(lines[:-1]))
    code, output = merge(first, cut, out=out)
    assert code != 0 and f"{cut}: predictions.csv and cv.json count fold 2's images" in output

    gone = report(tmp_path / "gone", folds[2:])
    (gone / "predictions.csv").unlink()
    code, output = merge(first, gone, out=out)
    assert code != 0 and f"{gone}: not a readable `fractured cv` report" in output

    # a fold run is checked against a report as against another run
    run = fake_run(tmp_path / "runs" / "f2", make_split(data, hashes=hashes_for()), k=5,
                   fold=2, flags=("augment.hflip=false",))
    result = CliRunner().invoke(main, ["cv", str(run), "--merge", str(first), "--out",
                                       str(out)])
    assert result.exit_code != 0
    assert f"{first}: base split (csv_sha256)" in result.output

    result = CliRunner().invoke(main, ["cv", "--out", str(out)])
    assert result.exit_code != 0 and "no fold runs and no reports to merge" in result.output
    assert not out.exists()


# -- a real 3-fold cross-validation through the CLI -----------------------------------------


@pytest.mark.slow
def test_three_fold_runs_train_and_cv_pools_their_validation_folds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = synthetic_yolo(tmp_path / "yolo", n=48)
    runner = CliRunner()
    runs = [tmp_path / f"f{fold}" for fold in range(3)]
    for fold, run in enumerate(runs):
        given = ["--set", f'data.base_split="{runs[0] / "split" / BASE_DIR}"'] if fold else []
        result = runner.invoke(main, ["train", str(data), "--out", str(run), "--task",
                                      "classifier", "--epochs", "1", "--device", "cpu",
                                      *SMOKE_FLAGS, "--set", "data.folds=3", "--set",
                                      f"data.fold={fold}", *given])
        assert result.exit_code == 0, result.output
    refused = runner.invoke(main, ["train", str(data), "--out", str(runs[0]), "--resume",
                                   "--task", "classifier", "--set", "data.fold=1"])
    assert refused.exit_code != 0
    assert "cannot resume with different [data].fold" in refused.output

    base = read_written(runs[0] / "split" / BASE_DIR)[1]
    test = {path for path, entry in base.items() if entry.split == "test"}
    vals = [{path for path, entry in read_written(run / "split")[1].items()
             if entry.split == "val"} for run in runs]
    assert sorted(p for val in vals for p in val) == sorted(set(base) - test)

    decoded: list[Path] = []
    letterbox = evaluate.letterbox_samples

    def recording(samples, *args, **kwargs):  # type: ignore[no-untyped-def]
        decoded.extend(sample.path for sample in samples)
        return letterbox(samples, *args, **kwargs)

    monkeypatch.setattr(evaluate, "letterbox_samples", recording)
    out = tmp_path / "cv"
    result = runner.invoke(main, ["cv", *map(str, runs), "--out", str(out), "--bootstrap",
                                  "50", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "\n3 of 3 folds: fold AUC " in result.output
    assert not {path.relative_to(data).as_posix() for path in decoded} & test

    record = json.loads((out / "cv.json").read_text())
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {Path(row["image"]).relative_to(data).as_posix() for row in rows} == \
        set(base) - test
    labels = np.array([int(row["label"]) for row in rows])
    prob = np.array([float(row["probability"]) for row in rows])
    assert record["pooled"]["n"] == len(rows) == 36
    assert record["pooled"]["roc_auc"] == pytest.approx(roc_auc_score(labels, prob), abs=1e-5)
    folds = np.array([int(row["fold"]) for row in rows])
    for row in record["folds"]:
        assert row["n"] == len(vals[row["fold"]])
        mask = folds == row["fold"]
        assert row["roc_auc"] == pytest.approx(roc_auc_score(labels[mask], prob[mask]),
                                               abs=1e-5)
    assert "| pooled |" in (out / "cv.md").read_text()

    # folds scored apart (as on two machines) and merged give the very same numbers
    apart = [tmp_path / "cv-0", tmp_path / "cv-12"]
    for out_dir, fold_runs in zip(apart, (runs[:1], runs[1:]), strict=True):
        result = runner.invoke(main, ["cv", *map(str, fold_runs), "--out", str(out_dir),
                                      "--bootstrap", "50", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    merged = tmp_path / "cv-merged"
    result = runner.invoke(main, ["cv", "--merge", str(apart[0]), "--merge", str(apart[1]),
                                  "--out", str(merged), "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    again = json.loads((merged / "cv.json").read_text())
    for key in ("folds", "pooled", "body_parts", "fold_auc_mean", "fold_auc_sd", "recipe"):
        assert again[key] == record[key], key
    assert (merged / "predictions.csv").read_text() == (out / "predictions.csv").read_text()

    # `fractured evaluate --split val` of a fold says the same AUC
    evaluated = runner.invoke(main, ["evaluate", str(runs[1]), "--split", "val",
                                     "--bootstrap", "50", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((runs[1] / "eval-val" / "metrics.json").read_text())
    assert metrics["classification"]["roc_auc"] == pytest.approx(record["folds"][1]["roc_auc"])
    assert metrics["data"]["fold"].startswith("fold 1 of 3")
