"""The default model that ships in the repository: what a fresh install runs.

Its bundle must verify, say it was trained, carry its held-out metrics in the model
card, and `fractured predict` must give, on FracAtlas images, the probabilities those
metrics were computed from (the evaluation's predictions.csv, kept under docs/).
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
SHIPPED = REPO / "engines" / "fractured-0.2.0"
EVALUATION = REPO / "docs" / "training" / "fracatlas-resnet18-e50" / "test"
#: images of the held-out split run through predict (half with fracture)
SAMPLED = 24
#: float16-stored weights and ONNX Runtime against the float32 PyTorch evaluation
PROBABILITY_TOLERANCE = 5e-3


def held_out_rows() -> list[dict[str, str]]:
    with open(EVALUATION / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_setup_activates_the_shipped_bundle() -> None:
    setup = (REPO / "tools" / "setup.sh").read_text()
    assert f"engines activate {SHIPPED.name} " in setup
    manifest = Bundle.load(SHIPPED).manifest  # verifies the schema and every checksum
    assert manifest.trained and f"{manifest.name}-{manifest.version}" == SHIPPED.name
    # its detector was trained but not shipped (validation AP50 0.005): the card says so
    assert manifest.detector is None
    assert "No box detector in this bundle" in (SHIPPED / "MODEL_CARD.md").read_text()


def test_model_card_holds_the_held_out_metrics_the_predictions_give() -> None:
    manifest = Bundle.load(SHIPPED).manifest
    held_out = manifest.training["held_out"]
    metrics = json.loads((EVALUATION / "metrics.json").read_text())
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
                                                   abs=PROBABILITY_TOLERANCE), row["file"]
