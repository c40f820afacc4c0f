"""Fusing the detector's best box score into the classifier's probability.

The manifest's `classifier.fusion` (read strictly, written back only where present),
the pipeline computing the fused probability from the same evidence `fractured fuse`
fits on, and `fractured fuse` end to end: weights fitted on the
validation part, operating points chosen again, the test part scored against the
classifier alone, a new bundle of the same model files that predicts what the report
says.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fractured.cli import main
from fractured.engine.bundle import (
    MANIFEST_FILE,
    Bundle,
    BundleError,
    Fusion,
    Manifest,
)
from fractured.engine.findings import ImageRef
from fractured.engine.pipeline import Pipeline
from fractured.engine.sources import load_image
from fractured.training.build import build_bundle
from fractured.training.evaluation import choose_operating_points
from fractured.training.evaluation.classification import paired_auc_difference
from fractured.training.export import BuildError
from fractured.training.fusion import fit_fusion
from tests import factory

WEIGHTS = {"logit_weight": 0.9, "box_weight": 1.7, "intercept": -1.3}


def fused_copy(bundle: Path, target: Path, fusion: dict | None = WEIGHTS,
               detector_points: dict | None = None) -> Path:
    """A copy of `bundle` whose manifest has `fusion` (the model files, and so the
    checksums, are unchanged: manifest.json is not among them)."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    if fusion is not None:
        manifest["classifier"]["fusion"] = fusion
    if detector_points is not None:
        manifest["detector"]["operating_points"] = detector_points
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def images(n: int = 3) -> list[np.ndarray]:
    return [factory.phantom(300 + 40 * i, 240 + 30 * i, seed=i).astype(np.float32) / 4095
            for i in range(n)]


def refs(n: int) -> list[ImageRef]:
    return [ImageRef("1.2.3", "1.2.3.4", f"1.2.3.4.{i}", "1.2.840.10008.5.1.4.1.1.1")
            for i in range(n)]


# -- the manifest --------------------------------------------------------------------------------

def test_a_fusion_is_read_written_back_and_absent_stays_absent(
        untrained_bundle_with_detector: Path, tmp_path: Path) -> None:
    plain = json.loads((untrained_bundle_with_detector / MANIFEST_FILE).read_text())
    manifest = Manifest.from_dict(plain)
    assert manifest.classifier.fusion is None
    assert "fusion" not in manifest.to_dict()["classifier"]  # not written as null
    assert manifest.to_dict() == plain
    fused = Bundle.load(fused_copy(untrained_bundle_with_detector, tmp_path / "fused"))
    assert fused.manifest.classifier.fusion == Fusion(**WEIGHTS)
    assert fused.manifest.to_dict()["classifier"]["fusion"] == WEIGHTS
    assert Fusion(**WEIGHTS).logit(2.0, 0.5) == pytest.approx(0.9 * 2 + 1.7 * 0.5 - 1.3)


@pytest.mark.parametrize(("fusion", "why"), [
    ({"logit_weight": 1.0, "box_weight": 1.0}, "missing key 'classifier.fusion.intercept'"),
    ({**WEIGHTS, "box_weight": "1.7"}, "'classifier.fusion.box_weight' must be a finite number"),
    ({**WEIGHTS, "box_weight": float("nan")}, "must be a finite number"),
    ({**WEIGHTS, "temperature": 2.0}, "unknown key(s) 'classifier.fusion.temperature'"),
    ([0.9, 1.7, -1.3], "'classifier.fusion' must be an object"),
])
def test_a_malformed_fusion_is_refused_by_name(untrained_bundle_with_detector: Path,
                                              fusion: object, why: str) -> None:
    data = json.loads((untrained_bundle_with_detector / MANIFEST_FILE).read_text())
    data["classifier"]["fusion"] = fusion
    with pytest.raises(BundleError) as caught:
        Manifest.from_dict(data)
    assert why in str(caught.value)


def test_a_fusion_without_a_detector_is_refused(untrained_bundle: Path) -> None:
    data = json.loads((untrained_bundle / MANIFEST_FILE).read_text())
    data["classifier"]["fusion"] = WEIGHTS
    with pytest.raises(BundleError, match="has a fusion with the detector's box score, but "
                                          "the bundle has no detector"):
        Manifest.from_dict(data)


# -- the pipeline --------------------------------------------------------------------------------

def test_the_fused_probability_is_the_formula_on_the_pipelines_evidence(
        untrained_bundle_with_detector: Path, tmp_path: Path) -> None:
    pictures = images()
    plain = Pipeline(Bundle.load(untrained_bundle_with_detector), backend="onnxruntime")
    evidence = plain.evidence(pictures)
    fused = Pipeline(Bundle.load(fused_copy(untrained_bundle_with_detector, tmp_path / "f")),
                     backend="onnxruntime", max_batch=2)  # two batches: rows stay in order
    alone = [f.probability for f in plain.run(list(zip(refs(3), pictures, strict=True)))]
    found = [f.probability for f in fused.run(list(zip(refs(3), pictures, strict=True)))]
    expected = 1 / (1 + np.exp(-(0.9 * evidence[:, 0] + 1.7 * evidence[:, 1] - 1.3)))
    assert found == pytest.approx(expected.tolist(), abs=1e-6)
    # the evidence's logit is the unfused pipeline's calibrated logit
    assert alone == pytest.approx((1 / (1 + np.exp(-evidence[:, 0]))).tolist(), abs=1e-6)
    assert found != pytest.approx(alone, abs=1e-3)


def test_the_best_box_score_is_the_best_box_the_detector_reports(
        untrained_bundle_with_detector: Path, tmp_path: Path) -> None:
    """Every box shown (detector threshold 0, boxes on every image): the evidence's box
    score is the best of them, and 0 on an image without any."""
    every = fused_copy(untrained_bundle_with_detector, tmp_path / "every", fusion=None,
                       detector_points={"high_sensitivity": 0.0, "high_specificity": 0.0})
    pipeline = Pipeline(Bundle.load(every), backend="onnxruntime", boxes="always")
    pictures = [*images(2), np.zeros((200, 160), np.float32)]
    findings = pipeline.run(list(zip(refs(3), pictures, strict=True)))
    evidence = pipeline.evidence(pictures)
    assert any(f.boxes for f in findings), "the untrained detector found no box to compare"
    for finding, score in zip(findings, evidence[:, 1], strict=True):
        best = max((box.score for box in finding.boxes), default=0.0)
        assert score == pytest.approx(best, abs=1e-6)


def test_test_time_augmentation_fuses_every_pass(untrained_bundle_with_detector: Path,
                                                 tmp_path: Path) -> None:
    pictures = images(2)
    identity = Bundle.load(fused_copy(untrained_bundle_with_detector, tmp_path / "identity",
                                      fusion={"logit_weight": 1.0, "box_weight": 0.0,
                                              "intercept": 0.0}))
    plain = Bundle.load(untrained_bundle_with_detector)
    pairs = list(zip(refs(2), pictures, strict=True))
    a = Pipeline(identity, backend="onnxruntime", tta=True).run(pairs)
    b = Pipeline(plain, backend="onnxruntime", tta=True).run(pairs)
    assert [v for f in a for v in (f.probability, f.spread)] == pytest.approx(
        [v for f in b for v in (f.probability, f.spread)], abs=1e-9)
    assert all(f.spread > 0 for f in b)  # the passes differ, so a per-pass slip would show
    certain = Bundle.load(fused_copy(untrained_bundle_with_detector, tmp_path / "certain",
                                     fusion={"logit_weight": 1.0, "box_weight": 0.0,
                                             "intercept": 60.0}))
    for finding in Pipeline(certain, backend="onnxruntime", tta=True).run(pairs):
        assert finding.probability == pytest.approx(1.0) and finding.spread == pytest.approx(0)


# -- fitting and the paired comparison ------------------------------------------------------------

def test_fit_fusion_is_a_logistic_regression_and_refuses_a_backwards_score() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    evidence = np.column_stack([labels * 1.5 + rng.normal(size=400),
                                labels * 0.3 + rng.random(400) * 0.5])
    fusion = fit_fusion(evidence, labels)
    reference = LogisticRegression().fit(evidence, labels)
    assert (fusion.logit_weight, fusion.box_weight) == pytest.approx(
        tuple(reference.coef_[0]), rel=1e-6)
    assert fusion.intercept == pytest.approx(reference.intercept_[0], rel=1e-6)
    backwards = evidence.copy()
    backwards[:, 1] = 1.0 - backwards[:, 1]  # confident boxes on normal images
    with pytest.raises(Exception, match="box score -"):
        fit_fusion(backwards, labels)
    with pytest.raises(Exception, match="both fractures and normals"):
        fit_fusion(evidence, np.zeros(400, dtype=int))


def test_the_paired_auc_difference_brackets_a_real_gain() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 300)
    weak = labels + rng.normal(scale=1.5, size=600)
    strong = labels + rng.normal(scale=0.5, size=600)
    result = paired_auc_difference(labels, weak, strong, bootstrap=200)
    assert result["before"] == pytest.approx(roc_auc_score(labels, weak))
    assert result["difference"] == pytest.approx(roc_auc_score(labels, strong)
                                                 - roc_auc_score(labels, weak))
    low, high = result["difference_ci95"]
    assert 0 < low < result["difference"] < high
    same = paired_auc_difference(labels, weak, weak, bootstrap=50)
    assert same["difference_ci95"] == [0.0, 0.0]
    one_class = paired_auc_difference(np.ones(5), weak[:5], strong[:5])
    assert one_class["before"] is None and "both fractures and normals" in one_class["note"]


# -- fractured fuse end to end ------------------------------------------------------------------

def dicom_check(bundle: str) -> dict:
    """A `fractured check-dicom` result of `bundle`, as dicom-check.json holds it."""
    return {"bundle": bundle, "part": "test", "images": 4, "unreadable": 0,
            "tolerance": 0.05, "tolerance_share": 0.95, "passed": False,
            "variants": [{"variant": "collimated", "images": 4, "mean_abs_change": 0.026,
                          "p95_abs_change": 0.08, "max_abs_change": 0.29,
                          "within_tolerance": 0.75, "decisions_changed": 1}]}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_fuse_fits_on_validation_scores_the_test_split_and_builds_a_bundle(
        scored_bundle, tmp_path: Path) -> None:
    _, split_dir, source = scored_bundle
    out, report = tmp_path / "fractured-1.1.0", tmp_path / "report"
    notes = tmp_path / "notes.md"
    notes.write_text("- Fused on a made-up rule.\n")
    check = tmp_path / "dicom-check.json"
    check.write_text(json.dumps(dicom_check("fractured-1.0.0")))
    result = CliRunner().invoke(main, ["fuse", str(source), "--split", str(split_dir),
                                       "--out", str(out), "--version", "1.1.0", "--report",
                                       str(report), "--bootstrap", "30", "--notes",
                                       str(notes), "--dicom-check", str(check),
                                       "--test-looks", "3"])
    assert result.exit_code == 0, result.output
    assert "test: AUC" in result.output and f"built {out}" in result.output
    old, new = Bundle.load(source).manifest, Bundle.load(out).manifest
    assert (new.name, new.version) == ("fractured", "1.1.0")
    assert {name: new.files[name] for name in old.files if name != "MODEL_CARD.md"} == \
        {name: old.files[name] for name in old.files if name != "MODEL_CARD.md"}
    assert new.detector == old.detector and new.backends == old.backends
    fusion = new.classifier.fusion
    assert fusion is not None and fusion.logit_weight > 0 and fusion.box_weight > 0

    # the weights are the regression of the node's own evidence on the val images ...
    split = rows(split_dir / "split.csv")
    val_names = {Path(row["relative_path"]).name for row in split if row["split"] == "val"}
    validation = rows(report / "validation.csv")
    assert {Path(row["image"]).name for row in validation} == val_names
    pipeline = Pipeline(Bundle.load(source), backend="onnxruntime")
    evidence = pipeline.evidence([load_image(Path(row["image"])).pixels for row in validation])
    written = np.array([[float(row["logit"]), float(row["box_score"])] for row in validation])
    assert written == pytest.approx(evidence, abs=1e-5)
    labels = np.array([int(row["label"]) for row in validation])
    reference = LogisticRegression().fit(evidence, labels)
    assert (fusion.logit_weight, fusion.box_weight, fusion.intercept) == pytest.approx(
        (*reference.coef_[0], reference.intercept_[0]), rel=1e-3)
    # ... and the operating points are chosen on the fused validation probability
    fused_val = np.array([float(row["probability"]) for row in validation])
    points, _ = choose_operating_points(labels, fused_val)
    assert new.classifier.operating_points.high_sensitivity == pytest.approx(
        points.high_sensitivity, abs=1e-5)
    assert new.classifier.operating_points.high_specificity == pytest.approx(
        points.high_specificity, abs=1e-5)

    # the test split is scored, the classifier alone beside the fused probability
    metrics = json.loads((report / "metrics.json").read_text())
    test = rows(report / "predictions.csv")
    test_names = {Path(row["relative_path"]).name for row in split if row["split"] == "test"}
    assert {Path(row["image"]).name for row in test} == test_names
    y = np.array([int(row["label"]) for row in test])
    fused = np.array([float(row["probability"]) for row in test])
    alone = np.array([float(row["classifier_probability"]) for row in test])
    assert metrics["classification"]["roc_auc"] == pytest.approx(roc_auc_score(y, fused))
    auc = metrics["fusion"]["auc"]["test"]
    assert auc["before"] == pytest.approx(roc_auc_score(y, alone))
    assert auc["after"] == pytest.approx(roc_auc_score(y, fused))
    held_out = new.training["held_out"]
    assert held_out["classification"]["roc_auc"] == metrics["classification"]["roc_auc"]
    assert new.training["fusion"]["weights"] == new.to_dict()["classifier"]["fusion"]
    assert new.training["classifier"]["from_bundle"] == "fractured-1.0.0"
    report_text = (report / "report.md").read_text()
    assert "## Fusion with the detector's best box score" in report_text
    card = (out / "MODEL_CARD.md").read_text()
    assert "The fracture probability is fused" in card
    assert "## Fusion with the box detector" in card and "Fused on a made-up rule." in card

    # what the node shows, per region, on the test part and pooled with validation
    node = metrics["node"]
    assert node["test"]["regions"]["all"]["images"] == len(test)
    assert node["validation_and_test"]["images"] == len(test) + len(validation)
    possible = fused >= new.classifier.operating_points.high_sensitivity
    assert node["test"]["regions"]["all"]["high_sensitivity"]["sensitivity"]["k"] == int(
        (possible & (y == 1)).sum())
    assert held_out["node"] == node and "### As the node shows it" in card
    assert "## Where it may be used" in card and "## Known failure modes" in card
    assert "## Stored as DICOM" in card and "| collimated | 0.026 |" in card
    assert "had been scored 3 times before these figures" in card
    assert new.training["dicom_check"]["bundle"] == "fractured-1.0.0"

    # predict on the new bundle says what the report says of the same images
    predicted = CliRunner().invoke(main, ["predict", *(row["image"] for row in test),
                                          "--bundle", str(out), "--json"])
    assert predicted.exit_code == 0, predicted.output
    found = [json.loads(line) for line in predicted.output.strip().splitlines()[-len(test):]]
    assert [row["probability"] for row in found] == pytest.approx(fused.tolist(), abs=1e-5)
    assert all(row["model"]["version"] == "1.1.0" for row in found)


@pytest.mark.slow
def test_fuse_refuses_what_it_cannot_fit_honestly(scored_bundle,
                                                  untrained_bundle_with_detector: Path,
                                                  tmp_path: Path) -> None:
    data, split_dir, source = scored_bundle
    runner = CliRunner()

    def fuse(bundle: Path, out: str = "new", *extra: str) -> str:
        result = runner.invoke(main, ["fuse", str(bundle), "--split", str(split_dir),
                                      "--dataset", str(data), "--out", str(tmp_path / out),
                                      "--version", "9.0.0", "--report",
                                      str(tmp_path / "report"), *extra])
        assert result.exit_code == 1, result.output
        return result.output

    other = fused_copy(source, tmp_path / "other-split", fusion=None)
    manifest = json.loads((other / MANIFEST_FILE).read_text())
    manifest["training"]["classifier"]["data"]["val_images"] += 1
    (other / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert "are not those fractured-1.0.0's classifier was trained and calibrated with" \
        in fuse(other)
    fused = fused_copy(source, tmp_path / "fused")
    manifest = json.loads((fused / MANIFEST_FILE).read_text())
    manifest["training"]["fusion"] = {"source": "fractured-1.0.0"}
    (fused / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert "already fused" in fuse(fused)
    assert "an untrained bundle has nothing to fuse" in fuse(untrained_bundle_with_detector)
    classifier_only = fused_copy(source, tmp_path / "classifier-only", fusion=None)
    manifest = json.loads((classifier_only / MANIFEST_FILE).read_text())
    manifest["detector"] = None
    manifest["files"] = {k: v for k, v in manifest["files"].items() if "detector" not in k}
    (classifier_only / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert "has no box detector" in fuse(classifier_only)
    assert "no image has a 'hardware' column" in fuse(source, "new", "--subset", "hardware=0")
    (tmp_path / "taken").mkdir()
    assert "already exists" in fuse(source, "taken")
    check = tmp_path / "dicom-check.json"
    check.write_text(json.dumps(dicom_check("fractured-0.8.1")))
    assert "a DICOM check of fractured-0.8.1, not of fractured-1.0.0" in fuse(
        source, "new", "--dicom-check", str(check))
    check.write_text("{}")
    assert "not a `fractured check-dicom` result" in fuse(source, "new", "--dicom-check",
                                                           str(check))
    # a fused classifier does not move to another detector: its weights fit this one's
    with pytest.raises(BuildError, match=r"take the classifier of fractured-1\.0\.0"):
        build_bundle([], tmp_path / "moved", name="fractured", version="9.0.0",
                     classifier_bundle=fused)
    assert not (tmp_path / "new").exists() and not (tmp_path / "report").exists()
