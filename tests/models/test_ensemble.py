"""`fractured ensemble`: seeds of one recipe on one split ([data].split_seed) averaged into
one calibrated classifier that evaluate, build-engine and every backend take as any other;
a bundle's ResNet joins a newer seed; members that cannot be averaged are refused."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fractured.cli import main
from fractured.engine.bundle import MANIFEST_FILE, Bundle, BundleError
from fractured.engine.models import ClassifierEnsemble, FractureClassifier, build_classifier
from fractured.engine.preprocess import to_model_input
from fractured.training import checkpoint
from fractured.training.data import letterbox_samples
from fractured.training.datasets.base import Sample
from fractured.training.export import IMAGENET_MEAN, IMAGENET_STD
from tests.models.test_training import split_parts, synthetic_yolo

SIZE = 64  # a ResNet18 at 64 px: a 2 x 2 CAM, a few seconds an epoch here
FLAGS = ["--epochs", "1", "--device", "cpu", "--set", "classifier.variant=resnet18",
         "--set", f"classifier.input_size={SIZE}", "--set", "classifier.batch_size=8",
         "--set", "detector.input_size=96", "--set", "run.workers=0",
         "--set", "data.val=0.25", "--set", "data.test=0.25"]


def train(runner: CliRunner, data: Path, out: Path, *extra: str) -> Path:
    result = runner.invoke(main, ["train", str(data), "--out", str(out), *FLAGS, *extra])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Seed 0 (with a detector), seed 1 on seed 0's split, and two runs that do not fit:
    seed 2 on its own split, and seed 1 at another input size."""
    data = synthetic_yolo(tmp_path_factory.mktemp("data") / "yolo")
    root = tmp_path_factory.mktemp("runs")
    runner = CliRunner()
    one = ("--task", "classifier", "--set", "data.split_seed=0")
    return {
        "data": data,
        "a": train(runner, data, root / "a", "--task", "both"),
        "b": train(runner, data, root / "b", *one, "--set", "run.seed=1"),
        "other_split": train(runner, data, root / "c", "--task", "both",
                             "--set", "run.seed=2"),
        "other_size": train(runner, data, root / "d", *one, "--set", "run.seed=1",
                            "--set", "classifier.input_size=32"),
    }


@pytest.fixture(scope="module")
def shipped(runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seed 0's classifier as a model in service ships: float16 ONNX, no torch weights."""
    bundle = tmp_path_factory.mktemp("engines") / "fractured-0.1.0"
    built = CliRunner().invoke(main, ["build-engine", str(runs["a"] / "classifier" /
                                                          checkpoint.BEST),
                                      "--out", str(bundle), "--float16-weights"])
    assert built.exit_code == 0, built.output
    return bundle


def logits_of(model: torch.nn.Module, image: Path) -> float:
    letterboxed = letterbox_samples([Sample(image, 1, "")], SIZE)
    batch = torch.from_numpy(to_model_input([letterboxed.images[0].astype(np.float32)],
                                            IMAGENET_MEAN, IMAGENET_STD))
    model.eval()
    with torch.no_grad():
        return float(model(batch)[0][0, 0])


def network(state: dict) -> torch.nn.Module:
    spec = state["model_spec"]
    model = build_classifier(spec["variant"], 1, spec.get("members", 1))
    model.load_state_dict(state["model"])
    return model


@pytest.mark.slow
def test_split_seed_keeps_the_split_while_the_training_seed_changes(runs) -> None:
    assert split_parts(runs["b"]) == split_parts(runs["a"])
    seeds = [json.loads((runs[name] / "split" / "split.json").read_text())["seed"]
             for name in ("a", "b", "other_split")]
    assert seeds == [0, 0, 2]
    a, b = (checkpoint.load(runs[name] / "classifier" / checkpoint.BEST)
            for name in ("a", "b"))
    assert not torch.equal(a["model"]["head.weight"], b["model"]["head.weight"])


@pytest.mark.slow
def test_an_ensemble_averages_its_members_and_ships_like_any_classifier(runs,
                                                                       tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ensemble"
    made = runner.invoke(main, ["ensemble", str(runs["a"]), str(runs["b"] / "classifier" /
                                                                  checkpoint.BEST),
                                "--out", str(out), "--detector", str(runs["a"]),
                                "--device", "cpu"])
    assert made.exit_code == 0, made.output
    state = checkpoint.load(out / "classifier" / checkpoint.BEST, "classifier")
    assert state["model_spec"]["members"] == 2
    assert state["model_spec"]["architecture"] == "2 x resnet18+attention"
    assert [member["seed"] for member in state["ensemble"]] == [0, 1]
    assert all(0 <= member["val_auc"] <= 1 for member in state["ensemble"])
    shift = state["calibration"]["logit_shift"]
    assert state["calibration"]["temperature"] > 0 and "achieved_on_val" in state["calibration"]

    # The ensemble's logit is its members' mean plus its own calibration shift.
    members = [network(checkpoint.load(runs[name] / "classifier" / checkpoint.BEST))
               for name in ("a", "b")]
    image = runs["data"] / "images" / "img001.png"
    expected = np.mean([logits_of(member, image) for member in members]) + shift
    ensemble = network(state)
    assert isinstance(ensemble, ClassifierEnsemble)
    assert logits_of(ensemble, image) == pytest.approx(expected, abs=1e-4)
    assert split_parts(out) == split_parts(runs["a"])
    assert (out / "detector" / checkpoint.BEST).is_file()

    # evaluate covers both models; the bundle says what the evaluation said
    report = tmp_path / "eval"
    evaluated = runner.invoke(main, ["evaluate", str(out), "--out", str(report),
                                     "--bootstrap", "20", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["model"]["classifier"]["members"] == 2 and "detection" in metrics
    bundle = tmp_path / "bundle"
    built = runner.invoke(main, ["build-engine", str(out), "--out", str(bundle),
                                 "--evaluation", str(report)])
    assert built.exit_code == 0, built.output
    manifest = Bundle.load(bundle).manifest
    assert manifest.classifier.members == 2 and manifest.detector is not None
    assert manifest.classifier.temperature == state["calibration"]["temperature"]
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "An ensemble of 2 networks" in card and "| 1 |" in card
    with open(report / "predictions.csv", newline="") as fh:
        wanted = {row["image"]: float(row["probability"]) for row in csv.DictReader(fh)}
    for backend in ("onnxruntime", "torch"):
        predicted = runner.invoke(main, ["predict", *wanted, "--bundle", str(bundle),
                                         "--backend", backend, "--json"])
        assert predicted.exit_code == 0, predicted.output
        rows = [json.loads(line)
                for line in predicted.output.strip().splitlines()[-len(wanted):]]
        for row in rows:
            assert row["probability"] == pytest.approx(wanted[row["file"]], abs=2e-3), backend


@pytest.mark.slow
def test_a_bundles_resnet_joins_a_newer_seed(runs, shipped: Path, tmp_path: Path) -> None:
    """A bundle keeps no torch weights: they are read back from its graph, and it is the
    same network in the ensemble."""
    runner = CliRunner()
    out = tmp_path / "ensemble"
    made = runner.invoke(main, ["ensemble", str(shipped), str(runs["b"]), "--out", str(out),
                                "--device", "cpu"])
    assert made.exit_code == 0, made.output
    state = checkpoint.load(out / "classifier" / checkpoint.BEST)
    assert state["ensemble"][0]["bundle"] == "fractured-0.1.0"
    ensemble = network(state)
    assert isinstance(ensemble, ClassifierEnsemble)
    original = network(checkpoint.load(runs["a"] / "classifier" / checkpoint.BEST))
    image = runs["data"] / "images" / "img003.png"
    shift = state["calibration"]["logit_shift"]
    member = ensemble.members[0]
    # the member's head carries the ensemble's shift; float16 storage costs ~1e-3
    assert logits_of(member, image) - shift == pytest.approx(logits_of(original, image),
                                                              abs=1e-2)


@pytest.mark.slow
def test_members_that_cannot_be_averaged_are_refused(runs, shipped: Path,
                                                     tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "refused"

    def refused(*args: str | Path) -> str:
        result = runner.invoke(main, ["ensemble", *map(str, args), "--out", str(out),
                                      "--device", "cpu"])
        assert result.exit_code == 1, result.output
        assert not out.exists()
        return result.output

    assert "another split" in refused(runs["a"], runs["other_split"])
    assert "input_size 32 differs" in refused(runs["a"], runs["other_size"])
    assert "at least two members" in refused(runs["a"])
    assert "did not finish" in refused(runs["a"], runs["b"] / "classifier" / checkpoint.LAST)
    assert "not trained on" in refused(runs["a"], runs["b"], "--detector",
                                       runs["other_split"])
    assert "must be a training run" in refused(shipped, shipped)
    assert "not a finished classifier run or bundle" in refused(runs["a"], runs["data"])
    out.mkdir()
    (out / "keep.txt").write_text("a run already here")
    result = runner.invoke(main, ["ensemble", str(runs["a"]), str(runs["b"]),
                                  "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output
    assert sorted(path.name for path in out.iterdir()) == ["keep.txt"]


def test_a_manifest_without_members_is_one_network(untrained_bundle: Path,
                                                   tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(untrained_bundle, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["classifier"].pop("members", None)
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert Bundle.load(copy).manifest.classifier.members == 1
    manifest["classifier"]["members"] = 0
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"'classifier\.members' must be a positive integer"):
        Bundle.load(copy)


def test_an_ensemble_is_the_mean_of_its_members() -> None:
    torch.manual_seed(0)
    ensemble = ClassifierEnsemble("resnet18", num_labels=1, members=3).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        logits, cam = ensemble(x)
        outputs = [member(x) for member in ensemble.members]
    assert torch.allclose(logits, torch.stack([o[0] for o in outputs]).mean(0), atol=1e-6)
    assert torch.allclose(cam, torch.stack([o[1] for o in outputs]).mean(0), atol=1e-6)
    assert torch.allclose(logits, cam.mean(dim=(2, 3)), atol=1e-5)  # still the CAM's mean
    assert isinstance(build_classifier("resnet18"), FractureClassifier)
    with pytest.raises(ValueError, match="at least 2 members"):
        ClassifierEnsemble("resnet18", members=1)
