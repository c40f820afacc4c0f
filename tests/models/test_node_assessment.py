"""What the node shows, scored per region: decisions at each region's points, boxes
behind the gate, heatmap peaks; checked against counts worked out by hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fractured.engine.exposed_field import Field
from fractured.engine.findings import Box, DecisionLevel, OperatingPoints
from fractured.engine.region_check import RegionSeen
from fractured.engine.regions import POOLED, Region
from fractured.training.bundle_scoring import Measured, changes
from fractured.training.datasets.base import BoxLabel, Sample
from fractured.training.evaluation.calibration import points_rule
from fractured.training.evaluation.classification import clopper_pearson
from fractured.training.evaluation.node_report import node_markdown
from fractured.training.model_card import model_card
from fractured.training.node_assessment import NodeView, assess, pooled, simulated_studies

POOLED_POINTS = {"high_sensitivity": 0.3, "high_specificity": 0.7}
HAND_POINTS = {"high_sensitivity": 0.5, "high_specificity": 0.9, "source": "region"}


def _box(x0: float, y0: float, x1: float, y1: float, score: float = 0.9) -> Box:
    return Box(x0, y0, x1, y1, score, DecisionLevel.LIKELY)


def _measured() -> tuple[Measured, np.ndarray]:
    """Six 100 x 200 (rows x columns) images: three hands, two legs, one mixed."""
    truth = (BoxLabel(0.1, 0.1, 0.3, 0.3),)  # columns 20-60, rows 10-30
    rows = [  # body part, label, probability, boxes drawn before gating, peak (x, y)
        ("hand", 1, 0.95, (_box(25, 12, 55, 28),), (30.0, 20.0)),  # likely; box outlines
        ("hand", 1, 0.60, (_box(50, 25, 90, 60),), (150.0, 50.0)),  # possible: box hidden
        ("hand", 0, 0.40, (_box(0, 0, 10, 10),), (100.0, 50.0)),  # negative at hand's 0.5
        ("leg", 1, 0.80, (_box(50, 25, 120, 90),), (58.0, 28.0)),  # likely; box touches
        ("leg", 0, 0.75, (_box(100, 50, 150, 90), _box(0, 60, 20, 99)), (199.0, 50.0)),
        ("mixed", 0, 0.20, (), None),  # a heatmap nowhere hot: no peak
    ]
    samples = tuple(Sample(Path(f"{i}.png"), label, body_part=part,
                           boxes=truth if label else ())
                    for i, (part, label, *_rest) in enumerate(rows))
    field = Field(0, 100, 0, 190, "image")  # a 10-column band on the right
    measured = Measured(
        samples=samples, evidence=np.zeros((6, 2)),
        labels=np.array([row[1] for row in rows]), unreadable=(),
        detections=("present",) * 6,  # type: ignore[arg-type]  # only their presence counts
        boxes=tuple(row[3] for row in rows), peaks=tuple(row[4] for row in rows),
        fields=(field,) * 6, shapes=((100, 200),) * 6)
    return measured, np.array([row[2] for row in rows])


def test_each_region_is_decided_at_its_own_points_with_exact_intervals() -> None:
    measured, probability = _measured()
    result = assess(measured, probability, points_rule(POOLED_POINTS, {"hand": HAND_POINTS}),
                    bootstrap=0)
    hand, leg, other, everything = (result["regions"][name]
                                    for name in ("hand", "leg", "other", "all"))
    assert (hand["points"], leg["points"], other["points"]) == ("own", "pooled", "pooled")
    assert everything["points"] == "mixed"
    # hand at 0.5 / 0.9: 0.95 likely, 0.60 possible, 0.40 negative
    assert hand["high_sensitivity"]["sensitivity"] == {
        "k": 2, "n": 2, "rate": 1.0, "interval": list(clopper_pearson(2, 2))}
    assert hand["high_sensitivity"]["specificity"]["k"] == 1
    assert hand["high_specificity"]["sensitivity"]["k"] == 1
    # leg at the pooled 0.3 / 0.7: both flagged likely, so its normal is missed at both
    assert leg["high_specificity"]["specificity"] == {"k": 0, "n": 1, "rate": 0.0,
                                                      "interval": [0.0, 0.975]}
    assert "hip" not in result["regions"]  # no images: no row
    assert everything["high_sensitivity"]["flagged"]["k"] == 4
    assert hand["roc_auc"] == 1.0 and other["roc_auc"] is None


def test_boxes_are_scored_behind_the_gate_in_source_pixels() -> None:
    measured, probability = _measured()
    rule = points_rule(POOLED_POINTS, {"hand": HAND_POINTS})
    likely = assess(measured, probability, rule, bootstrap=0)["boxes"]
    # drawn: image 0 (outlines its truth), image 3 (touches, IoU < 0.5), image 4 (2 stray)
    assert likely["fracture_boxes_touched"]["k"] == 2
    assert likely["fracture_boxes_touched"]["n"] == 3
    assert likely["fracture_boxes_outlined"]["k"] == 1
    assert likely["fractured_images_found"]["k"] == 2
    assert likely["boxes_on_normal_images"] == 2 and likely["normal_images"] == 3
    assert likely["boxes_per_normal_image"] == pytest.approx(2 / 3)
    possible = assess(measured, probability, rule, gate="possible", bootstrap=0)["boxes"]
    assert possible["fracture_boxes_touched"]["k"] == 3  # image 1's box now drawn


def test_the_heatmap_peak_is_scored_against_boxes_and_the_field() -> None:
    measured, probability = _measured()
    result = assess(measured, probability, points_rule(POOLED_POINTS, None), bootstrap=0)
    assert result["pointing_game"]["images"] == 3
    assert result["pointing_game"]["strict"]["k"] == 2  # (30, 20) and (58, 28)
    # (199, 50) lies on the band; the image without a peak is not counted
    assert result["peak_in_field"] == {"k": 4, "n": 5, "rate": 0.8,
                                       "interval": list(clopper_pearson(4, 5))}
    assert result["regions"]["hand"]["points"] == "pooled"  # a bundle without regions


def test_points_rule_matches_what_the_manifest_gives_the_node() -> None:
    rule = points_rule(POOLED_POINTS, {"hand": HAND_POINTS,
                                       "leg": {**HAND_POINTS, "source": "pooled"}})
    assert rule(Region.HAND) == (OperatingPoints(0.5, 0.9), Region.HAND)
    assert rule(Region.LEG) == (OperatingPoints(0.3, 0.7), POOLED)
    assert rule(None) == (OperatingPoints(0.3, 0.7), POOLED)
    assert points_rule(POOLED_POINTS, None)(Region.HAND) == (OperatingPoints(0.3, 0.7), None)


def test_validation_and_test_pool_into_one_assessment() -> None:
    measured, probability = _measured()
    view = NodeView(measured, probability, points_rule(POOLED_POINTS, None))
    both = view.assessed(measured, probability, bootstrap=0)
    assert both["test"]["images"] == 6 and both["validation_and_test"]["images"] == 12
    assert (both["validation_and_test"]["regions"]["hand"]["high_sensitivity"]
            ["sensitivity"]["n"] == 4)
    assert len(pooled(measured, measured).fields) == 12


def test_the_report_and_the_card_show_the_same_rows() -> None:
    measured, probability = _measured()
    node = NodeView(measured, probability,
                    points_rule(POOLED_POINTS, {"hand": HAND_POINTS})).assessed(
        measured, probability, bootstrap=0)
    text = "\n".join(node_markdown(node))
    assert "| hand | own | 2 / 1 | 1.000 | 1.000 (2/2; 0.158-1.000) |" in text
    assert "Validation and test pooled** (12 images)" in text
    assert "touch 0.667 (2/3; " in text and "2 boxes on 3 normal images" in text
    assert "inside the exposed field" in text and "Pointing game" in text
    manifest = {"name": "x", "version": "1", "trained": True,
                "classifier": {"architecture": "a", "variant": "v", "input_size": 8,
                               "labels": ["fracture"], "temperature": 1.0,
                               "operating_points": POOLED_POINTS},
                "detector": None, "mean": [0.5] * 3, "std": [0.2] * 3,
                "training": {"held_out": {"split": "test", "classification": {},
                                          "node": node}}}
    card = model_card(manifest, [])
    assert "### As the node shows it, per body region" in card
    assert "| hand | own | 2 / 1 |" in card


def test_decisions_changed_by_int8_are_counted_at_each_regions_points() -> None:
    measured, before = _measured()
    after = before.copy()
    after[2] = 0.55  # a normal hand moves from 0.40 across the hand's own 0.5 only
    rule = points_rule(POOLED_POINTS, {"hand": HAND_POINTS})
    changed = changes(measured, measured, before, after, rule)
    assert changed["decisions_changed"] == {"high_sensitivity": 1, "high_specificity": 0}
    pooled_only = changes(measured, measured, before, after, points_rule(POOLED_POINTS, None))
    assert pooled_only["decisions_changed"]["high_sensitivity"] == 0  # 0.40 -> 0.55 > 0.3


def test_the_study_verdict_is_scored_on_studies_made_within_each_region() -> None:
    # region a: 2 images, one study; region b: 3 images, whose lone last one joins
    labels = np.array([1, 0, 0, 0, 0])
    levels = [DecisionLevel.NEGATIVE, DecisionLevel.LIKELY,
              DecisionLevel.POSSIBLE, DecisionLevel.NEGATIVE, DecisionLevel.NEGATIVE]
    row = simulated_studies(labels, levels, ["a", "a", "b", "b", "b"])
    assert (row["studies"], row["fractured"]) == (2, 1)
    # a: fractured, highest level likely; b: normal, highest possible
    assert row["high_sensitivity"]["sensitivity"]["k"] == 1
    assert row["high_sensitivity"]["specificity"]["k"] == 0
    assert row["high_specificity"]["specificity"]["k"] == 1
    many = simulated_studies(np.zeros(90, dtype=int), [DecisionLevel.NEGATIVE] * 90,
                             ["hand"] * 90)
    assert many["studies"] == 30  # 2 + 3 + 4 = 9 images make 3 studies
    measured, probability = _measured()
    assessed = assess(measured, probability, points_rule(POOLED_POINTS, None), bootstrap=0)
    assert assessed["studies"]["studies"] >= 2
    assert "Study-level verdict" in "\n".join(node_markdown(
        {"gate": "likely", "test": assessed}))


def test_the_region_check_is_scored_with_the_body_part_hidden() -> None:
    measured, probability = _measured()
    assert assess(measured, probability, points_rule(POOLED_POINTS, None),
                  bootstrap=0)["region_check"] is None  # a bundle without one
    seen = tuple(RegionSeen(group, None if group == "other" else Region(group), distance,
                            familiar)
                 for group, distance, familiar in (
                     ("hand", 1.0, True), ("hand", 2.0, True), ("leg", 9.0, False),
                     ("leg", 1.0, True), ("leg", 1.5, True), ("hip", 3.0, True)))
    checked = replace(measured, seen=seen)
    result = assess(checked, probability, points_rule(POOLED_POINTS, None), bootstrap=0)
    check = result["region_check"]
    assert (check["accepted"]["k"], check["accepted"]["n"]) == (5, 6)
    # hands: 2 of 3 placed right (the third was seen as a leg); mixed seen as hip: wrong
    assert check["per_region"]["hand"]["k"] == 2 and check["per_region"]["other"]["k"] == 0
    assert check["region_correct"]["k"] == 4
    # the third hand is refused: the intended regions' acceptance is what users meet
    assert {name: (p["k"], p["n"]) for name, p in check["accepted_per_region"].items()} == {
        "hand": (2, 3), "leg": (2, 2), "other": (1, 1)}
    text = "\n".join(node_markdown({"gate": "likely", "test": result}))
    assert "Region check, with the body part hidden from the node: it accepts 0.833 (5/6;" \
        in text
    assert "Accepted, by labelled region: hand 0.667 (2/3;" in text
    assert len(pooled(checked, checked).seen) == 12
    # a check fitted on the validation part too (threshold by cross-validation over
    # train and val) is scored on the test part alone: pooled, it would score its fit
    for fitted_on_val, pooled_check in ((False, 12), (True, None)):
        view = NodeView(checked, probability, points_rule(POOLED_POINTS, None),
                        check_fitted_on_val=fitted_on_val)
        both = view.assessed(checked, probability, bootstrap=0)
        assert both["test"]["region_check"]["accepted"]["n"] == 6
        found = both["validation_and_test"]["region_check"]
        assert (found["accepted"]["n"] if found else None) == pooled_check
