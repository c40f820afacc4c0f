"""`fractured quantize`: INT8 graphs made from a bundle, checked against it, bundled.

The float16-stored graphs go back to float32 exactly, the quantizer's QDQ graphs are
recognised, and end to end: a bundle of INT8 graphs with its source's calibration and
operating points, whose report holds both bundles' numbers as the node computes them,
and which `fractured predict` runs to the report's probabilities.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from fractured.cli import main
from fractured.engine.bundle import CLASSIFIER_FILE, DETECTOR_FILE, MANIFEST_FILE, Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.sources import load_image
from fractured.training.export import (
    BuildError,
    float32_graph,
    is_quantized,
    store_weights_as_float16,
)
from fractured.training.quantize import check_auc_drop, kept_float, quantize_graph


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_graph(path: Path, batch: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})


def test_float16_stored_weights_come_back_as_the_float32_graph(untrained_bundle: Path,
                                                               tmp_path: Path) -> None:
    stored = tmp_path / "stored.onnx"
    shutil.copyfile(untrained_bundle / CLASSIFIER_FILE, stored)
    store_weights_as_float16(stored)
    plain = tmp_path / "plain.onnx"
    float32_graph(stored, plain)
    graph = onnx.load(str(plain)).graph
    assert not any(node.op_type == "Cast" and node.name.endswith("__float16__cast")
                   for node in graph.node)
    assert all(init.data_type == onnx.TensorProto.FLOAT for init in graph.initializer
               if init.dims and np.prod(init.dims) > 1000)
    batch = np.random.default_rng(0).normal(size=(2, 3, 128, 128)).astype(np.float32)
    for a, b in zip(run_graph(stored, batch), run_graph(plain, batch), strict=True):
        assert np.array_equal(a, b)  # the same float16-rounded values, computed alike
    assert not is_quantized(plain)


def test_a_validation_auc_drop_beyond_the_allowed_refuses_the_int8_graphs() -> None:
    check_auc_drop({"before": 0.90, "after": 0.897, "difference": -0.003}, 0.005)
    check_auc_drop({"before": 0.90, "after": 0.91, "difference": 0.01}, 0.0)
    with pytest.raises(BuildError, match=r"lose 0\.0100 of validation AUC \(0\.9000 -> "
                                         r"0\.8900\), more than the 0\.005 allowed"):
        check_auc_drop({"before": 0.90, "after": 0.89, "difference": -0.01}, 0.005)


def test_keep_float_leaves_the_named_convolutions_in_float32(
        untrained_bundle_with_detector: Path, tmp_path: Path) -> None:
    source = untrained_bundle_with_detector / DETECTOR_FILE
    kept = kept_float(source, ["model.rpn.head", "model.no_such_module"])
    assert kept["model.no_such_module"] == []
    head = kept["model.rpn.head"]
    assert len(head) >= 3  # its 3x3 conv, objectness and box deltas, at every FPN level
    rng = np.random.default_rng(0)
    batches = (rng.normal(size=(1, 3, 256, 256)).astype(np.float32) for _ in range(2))
    target = tmp_path / "int8.onnx"
    quantize_graph(source, target, tmp_path, batches, head)
    graph = onnx.load(str(target)).graph
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    int8_weights = {node.name: node.input[1] in dequantized for node in graph.node
                    if node.op_type == "Conv"}
    assert not any(int8_weights[name] for name in head)
    others = [quantized for name, quantized in int8_weights.items() if name not in head]
    assert others and all(others)
    boxes, scores, _ = run_graph(target, rng.normal(size=(1, 3, 256, 256)).astype(np.float32))
    assert boxes.shape[-1] == 4 and len(scores) == len(boxes)


@pytest.mark.slow
def test_quantize_builds_a_checked_int8_bundle_that_predicts_as_reported(
        scored_bundle, tmp_path: Path) -> None:
    _, split_dir, source = scored_bundle
    out, report = tmp_path / "fractured-1.0.1", tmp_path / "report"
    # the random-weight models' numbers move under INT8 more than trained ones' do, and
    # 12 validation images make a coarse AUC: the drop check has its own test above
    result = CliRunner().invoke(main, ["quantize", str(source), "--split", str(split_dir),
                                       "--out", str(out), "--version", "1.0.1", "--report",
                                       str(report), "--calibration-images", "8",
                                       "--bootstrap", "20", "--max-auc-drop", "1"])
    assert result.exit_code == 0, result.output
    assert "decisions changed" in result.output and f"built {out}" in result.output
    old, new = Bundle.load(source).manifest, Bundle.load(out).manifest
    for name in (CLASSIFIER_FILE, DETECTOR_FILE):
        assert is_quantized(out / name) and not is_quantized(source / name)
    assert new.classifier == old.classifier and new.detector == old.detector
    assert new.backends == ("onnxruntime",) and "classifier.pt" not in new.files
    summary = new.training["quantization"]
    assert summary["source"] == "fractured-1.0.0"
    assert summary["calibration"]["images"] == 8
    assert summary["models"] == ["classifier", "detector"]

    # the report holds both bundles' numbers as the node computes them ...
    validation = rows(report / "validation.csv")
    pixels = [load_image(Path(row["image"])).pixels for row in validation]
    for bundle, column in ((source, "source_probability"), (out, "probability")):
        evidence = Pipeline(Bundle.load(bundle), backend="onnxruntime").evidence(pixels)
        assert [float(row[column]) for row in validation] == pytest.approx(
            old.classifier.probability(evidence[:, 0], evidence[:, 1]).tolist(), abs=1e-5)
    test = rows(report / "predictions.csv")
    before = np.array([float(row["source_probability"]) for row in test])
    after = np.array([float(row["probability"]) for row in test])
    changes = summary["changes"]["test"]
    assert changes["max_probability_change"] == pytest.approx(np.abs(after - before).max(),
                                                              abs=1e-5)
    threshold = old.classifier.operating_points.high_specificity
    assert changes["decisions_changed"]["high_specificity"] == int(
        ((before >= threshold) != (after >= threshold)).sum())
    y = np.array([int(row["label"]) for row in test])
    assert summary["auc"]["test"]["after"] == pytest.approx(roc_auc_score(y, after))
    assert new.training["held_out"]["classification"]["roc_auc"] == pytest.approx(
        roc_auc_score(y, after))
    # both detectors scored against the true boxes; the held-out record is the INT8 one's
    detection = summary["detection"]
    assert detection["int8"]["gt_boxes"] == detection["source"]["gt_boxes"] > 0
    on_validation = summary["detection_validation"]  # where ways of quantizing are chosen
    assert on_validation["int8"]["gt_boxes"] == on_validation["source"]["gt_boxes"] > 0
    assert on_validation["int8"]["images"] == len(validation)
    assert new.training["held_out"]["detection"]["ap50"] == detection["int8"]["ap50"]
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["detection"]["ap50"] == detection["int8"]["ap50"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "## INT8 quantization" in card and "fractured-1.0.0" in card
    assert f"AP at IoU 0.5 {detection['source']['ap50']:.3f} (source)" in card
    assert "## INT8 quantization" in (report / "report.md").read_text()

    # ... and predict on the INT8 bundle gives the report's probabilities
    predicted = CliRunner().invoke(main, ["predict", *(row["image"] for row in test),
                                          "--bundle", str(out), "--json"])
    assert predicted.exit_code == 0, predicted.output
    found = [json.loads(line) for line in predicted.output.strip().splitlines()[-len(test):]]
    assert [row["probability"] for row in found] == pytest.approx(after.tolist(), abs=1e-5)

    # a quantized bundle is not quantized again, nor an untrained one at all
    again = CliRunner().invoke(main, ["quantize", str(out), "--split", str(split_dir),
                                      "--out", str(tmp_path / "again"), "--version", "1.0.2",
                                      "--report", str(tmp_path / "r2")])
    assert again.exit_code == 1 and "already quantized" in again.output
    unnamed = CliRunner().invoke(main, ["quantize", str(source), "--split", str(split_dir),
                                        "--out", str(tmp_path / "unnamed"), "--version",
                                        "1.0.2", "--report", str(tmp_path / "r4"),
                                        "--keep-float", "model.rpn.head",
                                        "--keep-float", "model.no_such_module"])
    assert unnamed.exit_code == 1 and (
        "--keep-float model.no_such_module: no convolution's weights are named so"
        in unnamed.output)
    copy = tmp_path / "untrained"
    shutil.copytree(source, copy)
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["trained"] = False
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    untrained = CliRunner().invoke(main, ["quantize", str(copy), "--split", str(split_dir),
                                          "--out", str(tmp_path / "u"), "--version", "1.0.2",
                                          "--report", str(tmp_path / "r3")])
    assert untrained.exit_code == 1 and "untrained bundle" in untrained.output
    assert not any((tmp_path / name).exists()
                   for name in ("again", "u", "r2", "r3", "unnamed", "r4"))
