"""`fractured evaluate`'s metrics, calibration, plots and report, against known answers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit

from fractured.training.evaluation import (
    choose_operating_points,
    classification_metrics,
    detection_metrics,
    expected_calibration_error,
    fit_temperature,
    plots,
    reliability_curve,
    subset_metrics,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- classification -----------------------------------------------------------------------

def test_perfect_classifier_has_auc_one_and_a_ci_at_one() -> None:
    labels = np.array([0] * 40 + [1] * 20)
    prob = np.concatenate([np.linspace(0.0, 0.4, 40), np.linspace(0.6, 1.0, 20)])
    result = classification_metrics(labels, prob, threshold=0.5, bootstrap=200)
    assert result["roc_auc"] == 1.0
    assert result["roc_auc_ci95"] == pytest.approx([1.0, 1.0], abs=1e-12)  # float rounding
    assert result["average_precision"] == pytest.approx(1.0)
    assert result["confusion"] == {"tp": 20, "fp": 0, "tn": 40, "fn": 0}
    assert result["sensitivity"] == result["specificity"] == result["accuracy"] == 1.0
    assert result["note"] is None
    # Of equally good thresholds, the fixed points take the one best on the other axis:
    # the lowest fracture score, 0.6, separates perfectly.
    for point in result["sensitivity_at_specificity"] + result["specificity_at_sensitivity"]:
        assert (point["threshold"], point["sensitivity"], point["specificity"]) == (
            pytest.approx(0.6), 1.0, 1.0)
    json.dumps(result, allow_nan=False)  # metrics.json must take it as is


def test_random_scores_give_auc_near_half_with_a_ci_containing_it() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 2000)
    prob = rng.random(2000)
    result = classification_metrics(labels, prob, threshold=0.5, bootstrap=400, seed=3)
    low, high = result["roc_auc_ci95"]
    assert abs(result["roc_auc"] - 0.5) < 0.03
    assert low < 0.5 < high
    assert 0.03 < high - low < 0.08  # about 4 standard errors of an AUC on 2,000 images
    # The interval is seeded: the same seed gives the same interval, another does not.
    again = classification_metrics(labels, prob, threshold=0.5, bootstrap=400, seed=3)
    other = classification_metrics(labels, prob, threshold=0.5, bootstrap=400, seed=4)
    assert again["roc_auc_ci95"] == result["roc_auc_ci95"] != other["roc_auc_ci95"]
    roc = result["roc_curve"]
    assert len(roc["fpr"]) <= 200 and len(result["pr_curve"]["recall"]) <= 200
    assert (roc["fpr"][0], roc["tpr"][0], roc["thresholds"][0]) == (0.0, 0.0, None)
    assert (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)


def test_counts_and_kappa_match_a_hand_computed_confusion_matrix() -> None:
    # tp 20, fn 5, fp 10, tn 65: observed agreement 0.85, chance agreement
    # 0.25 * 0.30 + 0.75 * 0.70 = 0.6, kappa (0.85 - 0.6) / (1 - 0.6) = 0.625.
    labels = np.array([1] * 25 + [0] * 75)
    prob = np.array([0.9] * 20 + [0.1] * 5 + [0.8] * 10 + [0.2] * 65)
    result = classification_metrics(labels, prob, threshold=0.5, bootstrap=0)
    assert result["confusion"] == {"tp": 20, "fp": 10, "tn": 65, "fn": 5}
    assert result["kappa"] == pytest.approx(0.625)
    assert result["accuracy"] == pytest.approx(0.85)
    assert result["precision"] == pytest.approx(20 / 30)
    assert result["recall"] == result["sensitivity"] == pytest.approx(0.8)
    assert result["specificity"] == pytest.approx(65 / 75)
    assert result["f1"] == pytest.approx(40 / 55)
    assert result["roc_auc_ci95"] is None  # bootstrap 0: no interval


def test_fixed_specificity_and_sensitivity_points_on_a_hand_built_case() -> None:
    negatives = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.45, 0.65]
    positives = [0.32, 0.50, 0.60, 0.70, 0.80]
    labels = np.array([0] * 10 + [1] * 5)
    result = classification_metrics(labels, np.array(negatives + positives), threshold=0.5,
                                    bootstrap=0)
    at_specificity = {point["target"]: point for point in result["sensitivity_at_specificity"]}
    # Specificity >= 90 % allows one false positive (0.65): from 0.50 up, 4 of 5 fractures.
    assert at_specificity[0.90] == pytest.approx(
        {"target": 0.90, "threshold": 0.50, "sensitivity": 0.8, "specificity": 0.9})
    # >= 95 % allows none: above 0.65, only 0.70 and 0.80 remain.
    assert at_specificity[0.95] == pytest.approx(
        {"target": 0.95, "threshold": 0.70, "sensitivity": 0.4, "specificity": 1.0})
    # Sensitivity >= 90 % of 5 means all 5: threshold 0.32 also calls 0.35-0.65.
    for point in result["specificity_at_sensitivity"]:
        assert point["threshold"] == pytest.approx(0.32)
        assert (point["sensitivity"], point["specificity"]) == pytest.approx((1.0, 0.6))


def test_one_class_and_empty_input_give_notes_not_crashes() -> None:
    negatives_only = classification_metrics(np.zeros(30, dtype=int), np.linspace(0, 1, 30),
                                            threshold=0.5)
    assert negatives_only["roc_auc"] is None and negatives_only["roc_auc_ci95"] is None
    assert negatives_only["average_precision"] is None
    assert negatives_only["sensitivity"] is None and negatives_only["roc_curve"] is None
    assert negatives_only["specificity"] == pytest.approx(15 / 30)
    assert "only non-fractures" in negatives_only["note"]
    assert "sensitivity is undefined" in negatives_only["note"]
    empty = classification_metrics(np.zeros(0, dtype=int), np.zeros(0), threshold=0.5)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["kappa"] is None
    assert "no images" in empty["note"]
    json.dumps([negatives_only, empty], allow_nan=False)


@pytest.mark.parametrize(("labels", "prob", "message"), [
    ([0, 1, 1], [0.2, 0.8], "3 labels but there are 2 scores"),
    ([0, 1], [-0.5, 2.0], r"2 probabilities lie outside \[0, 1\].*not logits"),
    ([0, 2], [0.1, 0.9], "only 0 and 1"),
    ([0, 1], [0.1, float("nan")], "NaN"),
])
def test_bad_input_is_refused_with_the_problem_named(labels: list[int], prob: list[float],
                                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, prob, threshold=0.5)


def test_subset_metrics_score_each_mask_and_note_empty_subsets() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    prob = np.array([0.1, 0.6, 0.7, 0.4, 0.2, 0.9])
    wrist = np.array([True, True, True, True, False, False])
    results = subset_metrics(labels, prob, {"wrist": wrist, "skull": np.zeros(6, dtype=bool)},
                             threshold=0.5, bootstrap=0)
    assert results["wrist"]["n"] == 4
    assert results["wrist"]["confusion"] == {"tp": 1, "fp": 1, "tn": 1, "fn": 1}
    assert results["wrist"]["roc_auc"] == pytest.approx(0.75)  # 3 of 4 pairs ranked right
    assert "roc_curve" not in results["wrist"]
    assert results["skull"]["n"] == 0 and "no images" in results["skull"]["note"]
    with pytest.raises(ValueError, match="boolean mask"):
        subset_metrics(labels, prob, {"hand": np.ones(6)}, threshold=0.5)


# -- calibration --------------------------------------------------------------------------

def test_ece_and_reliability_curve_on_a_hand_computed_case() -> None:
    # Bin [0, 0.5): mean 0.2, observed 0.5; bin [0.5, 1]: mean 0.9, observed 1.0.
    labels = [0, 1, 1, 1]
    prob = [0.2, 0.2, 0.8, 1.0]
    curve = reliability_curve(labels, prob, bins=2)
    assert curve["counts"] == [2, 2]  # probability 1.0 lands in the last bin
    assert curve["confidence"] == pytest.approx([0.2, 0.9])
    assert curve["frequency"] == pytest.approx([0.5, 1.0])
    assert expected_calibration_error(labels, prob, bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.1)
    assert reliability_curve(labels, prob, bins=4)["confidence"][1] is None  # empty bin


def test_ece_is_small_when_calibrated_and_large_when_over_confident() -> None:
    rng = np.random.default_rng(1)
    prob = rng.random(20000)
    labels = (rng.random(20000) < prob).astype(int)
    assert expected_calibration_error(labels, prob) < 0.02
    over_confident = expit(3 * logit(prob))
    assert expected_calibration_error(labels, over_confident) > 0.1


def test_fit_temperature_recovers_the_scale_of_the_logits() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, 50000)
    labels = (rng.random(50000) < expit(z)).astype(int)
    assert fit_temperature(2.0 * z, labels) == pytest.approx(2.0, rel=0.05)
    assert fit_temperature(z, labels) == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ValueError, match="both fractures and normals"):
        fit_temperature(z[:10], np.ones(10, dtype=int))


def test_operating_points_meet_their_targets_and_are_the_tightest_that_do() -> None:
    rng = np.random.default_rng(2)
    labels = np.array([1] * 300 + [0] * 700)
    prob = expit(np.concatenate([rng.normal(1.0, 1.0, 300), rng.normal(-1.0, 1.0, 700)]))
    points, description = choose_operating_points(labels, prob, sensitivity=0.95,
                                                  specificity=0.90)
    assert not description["crossed"] and description["note"] is None
    assert points.high_sensitivity < points.high_specificity

    def sensitivity(threshold: float) -> float:
        return float((prob[labels == 1] >= threshold).mean())

    def specificity(threshold: float) -> float:
        return float((prob[labels == 0] < threshold).mean())

    assert sensitivity(points.high_sensitivity) >= 0.95
    assert specificity(points.high_specificity) >= 0.90
    # The next score up loses the sensitivity target; the next score down the specificity.
    assert sensitivity(prob[prob > points.high_sensitivity].min()) < 0.95
    assert specificity(prob[prob < points.high_specificity].max()) < 0.90
    achieved = description["high_sensitivity"]
    assert achieved["threshold"] == points.high_sensitivity
    assert achieved["sensitivity"] == sensitivity(points.high_sensitivity)
    assert description["high_specificity"]["specificity"] == specificity(
        points.high_specificity)


def test_crossing_operating_points_meet_at_a_midpoint_that_meets_both_targets() -> None:
    # Separable scores: sensitivity 95 % holds up to the 19th-highest fracture score
    # (0.6 + 0.4/19), specificity 90 % from just above the 18th-lowest normal (0.4*18/19).
    labels = np.array([0] * 20 + [1] * 20)
    prob = np.concatenate([np.linspace(0.0, 0.4, 20), np.linspace(0.6, 1.0, 20)])
    points, description = choose_operating_points(labels, prob)
    assert description["crossed"] and "cross" in description["note"]
    assert points.high_sensitivity == points.high_specificity == pytest.approx(0.5)
    for name in ("high_sensitivity", "high_specificity"):
        assert description[name]["sensitivity"] >= 0.95
        assert description[name]["specificity"] >= 0.90


def test_operating_points_refuse_data_that_cannot_support_them() -> None:
    with pytest.raises(ValueError, match="both fractures and normals"):
        choose_operating_points([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="unreachable"):
        choose_operating_points([0, 0, 1], [0.1, 1.0, 0.9], specificity=1.0)


# -- detection ----------------------------------------------------------------------------

def _box(x: float, y: float, size: float = 40.0) -> list[float]:
    return [x, y, x + size, y + size]


TRUTHS = [np.array([_box(10, 10)]), np.array([_box(0, 0), _box(100, 100)])]


def test_perfect_detections_score_one(capsys: pytest.CaptureFixture[str]) -> None:
    result = detection_metrics([(truth, np.full(len(truth), 0.9)) for truth in TRUTHS], TRUTHS)
    assert result["ap50"] == pytest.approx(1.0) and result["ap50_95"] == pytest.approx(1.0)
    assert all(level["recall"] == 1.0 for level in result["froc"])
    assert result["lesion_sensitivity"] == result["image_sensitivity"] == 1.0
    assert capsys.readouterr().out == ""  # pycocotools' printing is swallowed
    json.dumps(result, allow_nan=False)


def test_boxes_shifted_below_half_overlap_score_zero() -> None:
    # Shifted by half a box: intersection 20 x 40 over union 2,400, IoU 1/3.
    shifted = [(truth + np.array([20, 0, 20, 0]), np.full(len(truth), 0.9)) for truth in TRUTHS]
    result = detection_metrics(shifted, TRUTHS)
    assert result["ap50"] == 0.0 and result["lesion_sensitivity"] == 0.0
    assert result["froc_score"] == 0.0


def test_froc_on_a_hand_built_case() -> None:
    # Score order: 0.9 hit (A), 0.8 false, 0.7 false, 0.6 hit (B), 0.5 a second box on B
    # (false: B is counted once), 0.3 hit (C). Over 2 images: recall 1/3 at 0.5 FP per
    # image, 2/3 at 1, all 3 at 1.5.
    predictions = [
        (np.array([_box(10, 10), _box(300, 300)]), np.array([0.9, 0.8])),
        (np.array([_box(300, 0), _box(0, 0), _box(2, 2), _box(100, 100)]),
         np.array([0.7, 0.6, 0.5, 0.3])),
    ]
    result = detection_metrics(predictions, TRUTHS, threshold=0.65)
    recall = {level["fppi"]: level["recall"] for level in result["froc"]}
    assert recall[0.5] == pytest.approx(1 / 3)
    assert recall[1.0] == pytest.approx(2 / 3)
    assert recall[2.0] == recall[8.0] == 1.0
    assert result["froc_score"] == pytest.approx((3 / 3 + 2 / 3 + 3) / 7)
    assert result["froc_curve"]["fppi"] == pytest.approx([0, 0, 0.5, 1, 1, 1.5, 1.5])
    assert result["lesion_sensitivity"] == result["image_sensitivity"] == 1.0
    assert result["at_threshold"] == pytest.approx({
        "threshold": 0.65, "lesion_sensitivity": 1 / 3, "image_sensitivity": 0.5,
        "false_positives_per_image": 1.0})
    assert (result["images"], result["gt_boxes"], result["predictions"]) == (2, 3, 6)


def test_boxes_on_normal_images_are_false_positives() -> None:
    # A normal image's box outscores the one true hit: precision 1/2 at full recall.
    predictions = [(np.array([_box(0, 0)]), np.array([0.5])),
                   (np.array([_box(0, 0)]), np.array([0.9]))]
    result = detection_metrics(predictions, [np.array([_box(0, 0)]), np.zeros((0, 4))])
    assert result["ap50"] == pytest.approx(0.5)
    recall = {level["fppi"]: level["recall"] for level in result["froc"]}
    assert recall[0.25] == 0.0 and recall[0.5] == 1.0
    assert result["images_with_fracture"] == 1


def test_detection_without_ground_truth_gives_a_note() -> None:
    result = detection_metrics([(np.array([_box(0, 0)]), np.array([0.9]))], [np.zeros((0, 4))])
    assert result["ap50"] is None and result["froc"] is None
    assert "no ground-truth boxes" in result["note"]
    with pytest.raises(ValueError, match="must pair up"):
        detection_metrics([], TRUTHS)
    with pytest.raises(ValueError, match="x1 > x0"):
        detection_metrics([(np.array([[10, 10, 5, 20]]), np.array([0.5]))], TRUTHS[:1])


# -- plots and report ---------------------------------------------------------------------

def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small evaluation's metrics and every plot, written once for the report tests."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    logits = 3.0 * (labels - 0.5) + rng.normal(0.0, 1.5, 300)
    temperature = fit_temperature(logits, labels)
    before, after = expit(logits), expit(logits / temperature)
    points, operating = choose_operating_points(labels, after)
    classification = classification_metrics(labels, after, threshold=points.high_sensitivity,
                                            bootstrap=100)
    detection = detection_metrics([(truth, np.full(len(truth), 0.9)) for truth in TRUTHS],
                                  TRUTHS)
    history = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.6, "val_auc": None},
               {"epoch": 2, "train_loss": 0.5, "val_loss": 0.5, "val_auc": 0.81, "lr": 1e-3}]
    folder = tmp_path_factory.mktemp("evaluation")
    written = {
        "ROC": plots.plot_roc(folder / "plots" / "roc.png", classification, operating),
        "Precision-recall": plots.plot_pr(folder / "plots" / "pr.png", classification),
        "Confusion matrix": plots.plot_confusion(folder / "plots" / "confusion.png",
                                                 classification),
        "Reliability": plots.plot_reliability(folder / "plots" / "reliability.png", labels,
                                              before, after, temperature=temperature),
        "FROC": plots.plot_froc(folder / "plots" / "froc.png", detection),
        "Training": plots.plot_training(folder / "plots" / "training.png", history),
    }
    metrics = {
        "classification": classification,
        "operating_points": operating,
        "calibration": {"temperature": temperature,
                        "ece_before": expected_calibration_error(labels, before),
                        "ece_after": expected_calibration_error(labels, after)},
        "subsets": subset_metrics(labels, after, {"hardware == 0": labels >= 0,
                                                  "empty": labels < 0},
                                  threshold=points.high_sensitivity, bootstrap=50),
        "detection": detection,
    }
    return {"folder": folder, "plots": written, "metrics": metrics}


def test_plots_are_small_valid_pngs(evaluation: dict) -> None:
    for name, path in evaluation["plots"].items():
        width, height = _png_size(path)
        expected = (600, 630) if name == "Training" else (600, 450)
        assert (width, height) == expected, name


def test_plots_of_undefined_curves_still_render(tmp_path: Path) -> None:
    one_class = classification_metrics([0, 0, 0], [0.1, 0.2, 0.3], threshold=0.5)
    assert _png_size(plots.plot_roc(tmp_path / "roc.png", one_class)) == (600, 450)
    with pytest.raises(ValueError, match="no training history"):
        plots.plot_training(tmp_path / "training.png", [])


def test_report_of_an_untrained_model_has_the_banner_numbers_and_plots(
        evaluation: dict) -> None:
    folder = evaluation["folder"] / "untrained"
    plot_files = dict(evaluation["plots"], Missing=evaluation["folder"] / "nowhere.png")
    report = write_report(folder, title="fractured-untrained 0.0.0", metrics=evaluation["metrics"],
                          plots=plot_files, model={"name": "fractured-untrained", "input": 128,
                                                   "weights": Path("/engines/model.onnx")},
                          data={"format": "fracatlas", "images": np.int64(300)}, trained=False)
    assert report == folder / "report.md"
    text = report.read_text()
    assert text.startswith("# fractured-untrained 0.0.0 (UNTRAINED MODEL)")
    assert "THESE NUMBERS MEAN NOTHING" in text.split("##")[0]  # above every section
    classification = evaluation["metrics"]["classification"]
    low, high = classification["roc_auc_ci95"]
    assert f"| ROC AUC | {classification['roc_auc']:.3f} | {low:.3f}-{high:.3f}" in text
    confusion = classification["confusion"]
    assert f"| Fracture | {confusion['tp']} | {confusion['fn']} |" in text
    assert "| hardware == 0 | 300 |" in text and "no images" in text
    assert "| AP@0.5 | 1.000 |" in text
    for name, path in evaluation["plots"].items():
        link = f"![{name}](../plots/{path.name})"
        assert link in text and (folder / "../plots" / path.name).is_file()
    assert "_missing:" in text and "![Missing]" not in text

    record = json.loads((folder / "metrics.json").read_text())
    assert record["trained"] is False
    assert record["classification"]["roc_auc"] == pytest.approx(classification["roc_auc"])
    assert record["classification"]["roc_auc_ci95"] == pytest.approx([low, high])
    assert record["operating_points"]["high_sensitivity"]["threshold"] == pytest.approx(
        classification["threshold"])
    assert record["detection"]["ap50"] == pytest.approx(1.0)
    assert record["data"]["images"] == 300 and record["model"]["weights"] == "/engines/model.onnx"
    assert record["plots"]["ROC"] == "../plots/roc.png"


def test_report_of_a_trained_model_has_no_banner_and_survives_degenerate_sections(
        tmp_path: Path) -> None:
    metrics = {
        "classification": classification_metrics([1, 1], [0.7, 0.9], threshold=0.5),
        "detection": detection_metrics([(np.zeros((0, 4)), np.zeros(0))], [np.zeros((0, 4))]),
        "extra": {"nan": float("nan")},
    }
    report = write_report(tmp_path, title="fractured 1.0.0", metrics=metrics, plots={},
                          model={}, data={}, trained=True)
    text = report.read_text()
    assert "UNTRAINED" not in text and "## Plots" not in text
    assert "| ROC AUC | - | - |" in text and "| AP@0.5 | - |" in text
    assert "_Note: only fractures (2 images)" in text and "_Note: no ground-truth boxes" in text
    assert json.loads((tmp_path / "metrics.json").read_text())["extra"] == {"nan": None}
    with pytest.raises(ValueError, match="report's own keys"):
        write_report(tmp_path, title="x", metrics={"model": {}}, plots={}, model={}, data={},
                     trained=True)


def test_score_threshold_at_fp_is_the_lowest_threshold_within_the_budget() -> None:
    from fractured.training.evaluation.detection import score_threshold_at_fp

    truth = [np.array([[0, 0, 10, 10]]), np.zeros((0, 4))]
    # image 0: a hit at 0.9 and a false box at 0.6; image 1 (normal): false boxes 0.8, 0.3
    predictions = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.6])),
                   (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), np.array([0.8, 0.3]))]
    strict = score_threshold_at_fp(predictions, truth, 0.0)
    assert strict["threshold"] == 0.9 and strict["false_positives_per_image"] == 0.0
    assert strict["lesion_sensitivity"] == 1.0
    half = score_threshold_at_fp(predictions, truth, 0.5)  # one false box over 2 images
    assert half["threshold"] == 0.8 and half["false_positives_per_image"] == 0.5
    loose = score_threshold_at_fp(predictions, truth, 8.0)
    assert loose["threshold"] == 0.3 and loose["false_positives_per_image"] == 1.5
    over = score_threshold_at_fp([(np.array([[50, 50, 60, 60]]), np.array([0.7])),
                                  (np.zeros((0, 4)), np.zeros(0))], truth, 0.0)
    assert over["threshold"] == 1.0 and over["lesion_sensitivity"] == 0.0


def test_report_lists_unreadable_images_in_their_own_section(tmp_path: Path) -> None:
    left_out = [{"path": f"/data/IMG{i:04d}.jpg", "reason": "truncated JPEG"} for i in range(3)]
    report = write_report(tmp_path, title="fractured 1.0.0", metrics={}, plots={}, model={},
                          data={"format": "fracatlas", "unreadable": left_out}, trained=True)
    text = report.read_text()
    assert "| unreadable | 3 images left out (listed below) |" in text
    assert "## Left out: 3 unreadable images" in text
    assert "| /data/IMG0002.jpg | truncated JPEG |" in text
    assert '{"path"' not in text  # no JSON blob in the Data table
    assert "Leakage" not in text
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["data"]["unreadable"] == left_out


def test_report_warns_of_groups_crossing_a_shipped_split(tmp_path: Path) -> None:
    warning = "3 groups of the same patient (7 images) cross the dataset's own splits"
    text = write_report(tmp_path, title="t", metrics={}, plots={}, model={},
                        data={"leakage_warning": warning}, trained=True).read_text()
    assert f"> **Leakage:** {warning}." in text.split("## ")[0]  # above every section


def test_shift_and_temperature_undo_a_class_weight_shift() -> None:
    from fractured.training.evaluation.calibration import (
        expected_calibration_error,
        fit_shift_and_temperature,
        fit_temperature,
    )

    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 20000)
    # true P(fracture) = sigmoid((logit - 1.5) / 0.7): logits inflated as class weights do
    labels = (rng.random(20000) < 1 / (1 + np.exp(-(logits - 1.5) / 0.7))).astype(int)
    shift, temperature = fit_shift_and_temperature(logits, labels)
    assert shift == pytest.approx(-1.5, abs=0.1) and temperature == pytest.approx(0.7, abs=0.05)
    shifted = 1 / (1 + np.exp(-(logits + shift) / temperature))
    scaled = 1 / (1 + np.exp(-logits / fit_temperature(logits, labels)))
    assert expected_calibration_error(labels, shifted) < 0.02
    assert expected_calibration_error(labels, scaled) > 0.05  # no temperature can do it
    # logits that rank backwards: no shift, a temperature alone (the fallback)
    assert fit_shift_and_temperature(-logits, labels)[0] == 0.0


def test_a_subset_with_few_fractures_carries_a_note() -> None:
    labels = np.array([1, 1] + [0] * 30 + [1] * 10 + [0] * 10)
    prob = np.linspace(0, 1, len(labels))
    masks = {"rare": np.arange(len(labels)) < 32, "common": np.arange(len(labels)) >= 32}
    result = subset_metrics(labels, prob, masks, threshold=0.5, bootstrap=0)
    assert "only 2 fracture image(s)" in result["rare"]["note"]
    assert result["common"]["note"] is None
