"""The default model that ships in the repository: what a fresh install runs.

Its bundle must verify, say it was trained, carry its held-out metrics in the model
card, and `fractured predict` must give, on FracAtlas images, the probabilities and the
boxes those metrics were computed from (the reports' predictions.csv and boxes.csv,
kept under docs/). Its probability is fused with the detector's box score
(`fractured fuse`): the classifier's part of it must be what the classifier's own
PyTorch evaluation computed, so the fusion report rests on the evaluated model.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from fractured.cli import main
from fractured.engine.bundle import Bundle
from tests import factory

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "engines" / "fractured-0.4.0"
#: the same two models with the classifier's probability alone, kept for rollback
ROLLBACK = REPO / "engines" / "fractured-0.3.0"
#: the fused probability's held-out report (`fractured fuse`, ONNX Runtime)
FUSION = REPO / "docs" / "training" / "fracatlas-fusion" / "test"
#: the classifier's held-out evaluation (PyTorch, float32; 0.2.0's run, whose classifier
#: 0.3.0 and 0.4.0 hold byte for byte)
EVALUATION = REPO / "docs" / "training" / "fracatlas-resnet18-e50" / "test"
#: the detector's
DETECTOR_EVALUATION = REPO / "docs" / "training" / "fracatlas-det128" / "test"
#: images of the held-out split run through predict (half with fracture)
SAMPLED = 24
#: float16-stored weights and ONNX Runtime against the float32 PyTorch evaluation
PROBABILITY_TOLERANCE = 5e-3
#: predict against the fusion report: the same graphs and pipeline, the CSV's rounding
FUSED_TOLERANCE = 1e-4
BOX_SCORE_TOLERANCE = 0.02
BOX_PIXELS = 3.0  # source pixels, FracAtlas images being up to 1024 px


def held_out_rows(report: Path = FUSION) -> list[dict[str, str]]:
    with open(report / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_setup_activates_the_shipped_bundle() -> None:
    setup = (REPO / "tools" / "setup.sh").read_text()
    assert f"engines activate {SHIPPED.name} " in setup
    manifest = Bundle.load(SHIPPED).manifest  # verifies the schema and every checksum
    assert manifest.trained and f"{manifest.name}-{manifest.version}" == SHIPPED.name
    assert manifest.detector is not None and manifest.detector.architecture == \
        "fasterrcnn_resnet18_fpn"
    assert manifest.classifier.fusion is not None
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "Box detector" in card and "No box detector" not in card
    assert "The fracture probability is fused" in card


def test_the_rollback_bundle_holds_the_same_models_unfused() -> None:
    shipped, rollback = (Bundle.load(path).manifest for path in (SHIPPED, ROLLBACK))
    assert rollback.classifier.fusion is None
    for name in ("classifier.onnx", "detector.onnx"):
        assert shipped.files[name] == rollback.files[name]
    assert shipped.training["fusion"]["source"] == ROLLBACK.name


def test_the_fused_probability_rests_on_the_evaluated_classifier() -> None:
    """The fusion report's classifier probability (ONNX Runtime, float16-stored weights)
    is, image for image, the one the classifier's PyTorch evaluation computed."""
    evaluated = {Path(row["image"]).name: float(row["probability"])
                 for row in held_out_rows(EVALUATION)}
    fused = held_out_rows()
    assert sorted(Path(row["image"]).name for row in fused) == sorted(evaluated)
    for row in fused:
        assert float(row["classifier_probability"]) == pytest.approx(
            evaluated[Path(row["image"]).name], abs=PROBABILITY_TOLERANCE), row["image"]

def test_model_card_holds_the_detectors_held_out_metrics() -> None:
    held_out = Bundle.load(SHIPPED).manifest.training["held_out"]
    metrics = json.loads((DETECTOR_EVALUATION / "metrics.json").read_text())
    assert held_out["detection"]["ap50"] == metrics["detection"]["ap50"]
    with open(DETECTOR_EVALUATION / "boxes.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == metrics["detection"]["predictions"]


def test_model_card_holds_the_held_out_metrics_the_predictions_give() -> None:
    manifest = Bundle.load(SHIPPED).manifest
    held_out = manifest.training["held_out"]
    metrics = json.loads((FUSION / "metrics.json").read_text())
    assert held_out["classification"]["roc_auc"] == metrics["classification"]["roc_auc"]
    rows = held_out_rows()
    labels = np.array([int(row["label"]) for row in rows])
    prob = np.array([float(row["probability"]) for row in rows])
    assert len(rows) == held_out["classification"]["n"]
    assert roc_auc_score(labels, prob) == pytest.approx(held_out["classification"]["roc_auc"],
                                                        abs=1e-4)
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    row = re.search(r"^\| all \| (\d+) \| (\d+) \| ([0-9.]+) ", card, re.MULTILINE)
    assert row is not None, "the card has no held-out results table"
    assert (int(row[1]), int(row[2])) == (len(rows), int(labels.sum()))
    assert float(row[3]) == pytest.approx(roc_auc_score(labels, prob), abs=5e-4)
    assert "CC BY 4.0" in card and "FracAtlas" in card
    assert "UNTRAINED" not in card


@pytest.mark.slow
def test_predict_on_fracatlas_gives_the_evaluated_probabilities() -> None:
    if not (factory.SHARED_FRACATLAS / "images").is_dir():
        pytest.skip(f"{factory.SHARED_FRACATLAS} is absent (../shared sits beside the development "
                    "checkout)")
    rows = held_out_rows()
    rng = np.random.default_rng(0)
    chosen = []
    for label in ("1", "0"):
        part = [row for row in rows if row["label"] == label]
        chosen += [part[i] for i in rng.permutation(len(part))[:SAMPLED // 2]]
    files = [factory.SHARED_FRACATLAS / "images" / Path(row["image"]).name for row in chosen]
    result = CliRunner().invoke(main, ["predict", *map(str, files), "--bundle", str(SHIPPED),
                                       "--json"])
    assert result.exit_code == 0, result.output
    found = [json.loads(line) for line in result.output.strip().splitlines()[-len(files):]]
    assert [row["file"] for row in found] == list(map(str, files))
    for row, expected in zip(found, chosen, strict=True):
        assert row["model"]["trained"] is True
        assert row["probability"] == pytest.approx(float(expected["probability"]),
                                                   abs=FUSED_TOLERANCE), row["file"]


@pytest.mark.slow
def test_predict_on_fracatlas_gives_the_evaluated_boxes() -> None:
    """The shipped detector graph (float16-stored weights, ONNX Runtime) finds the boxes
    the float32 PyTorch evaluation found, where their scores are clear of the threshold
    (float16 rounding may move a box that sits on it either way)."""
    if not (factory.SHARED_FRACATLAS / "images").is_dir():
        pytest.skip(f"{factory.SHARED_FRACATLAS} is absent (../shared sits beside the development "
                    "checkout)")
    threshold = Bundle.load(SHIPPED).manifest.detector.operating_points.high_sensitivity
    evaluated: dict[str, list[tuple[float, np.ndarray]]] = {}
    with open(DETECTOR_EVALUATION / "boxes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            corners = np.array([float(row[k]) for k in ("x0", "y0", "x1", "y1")])
            evaluated.setdefault(Path(row["image"]).name, []).append(
                (float(row["score"]), corners))
    clear = sorted(name for name, boxes in evaluated.items()
                   if max(score for score, _ in boxes) >= threshold + BOX_SCORE_TOLERANCE)
    chosen = [clear[i] for i in np.random.default_rng(0).permutation(len(clear))[:SAMPLED]]
    assert len(chosen) >= SAMPLED // 2, "too few images with clear boxes to compare"
    files = [factory.SHARED_FRACATLAS / "images" / name for name in chosen]
    result = CliRunner().invoke(main, ["predict", *map(str, files), "--bundle", str(SHIPPED),
                                       "--json", "--boxes", "always"])
    assert result.exit_code == 0, result.output
    found = [json.loads(line) for line in result.output.strip().splitlines()[-len(files):]]
    for name, row in zip(chosen, found, strict=True):
        predicted = [(box["score"], np.array([box[k] for k in ("x0", "y0", "x1", "y1")]))
                     for box in row["boxes"]]
        for score, corners in evaluated[name]:
            if score < threshold + BOX_SCORE_TOLERANCE:
                continue
            assert any(abs(score - s) <= BOX_SCORE_TOLERANCE
                       and np.abs(corners - c).max() <= BOX_PIXELS for s, c in predicted), \
                (name, score, corners, predicted)
