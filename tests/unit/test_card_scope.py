"""The card's scope: regions with the counts behind their figures, the source
population, the known failure modes, the test part's looks and the DICOM check."""

from __future__ import annotations

from typing import Any

from fractured.training.card_scope import FEW_FRACTURES, scope
from fractured.training.evaluation.classification import proportion
from fractured.training.model_card import model_card


def _row(fractures: int, found: int, normals: int) -> dict[str, Any]:
    point = {"sensitivity": proportion(found, fractures),
             "specificity": proportion(normals // 2, normals),
             "flagged": proportion(found, fractures + normals)}
    return {"images": fractures + normals, "fractures": fractures, "normals": normals,
            "points": "own", "roc_auc": None, "roc_auc_ci95": None,
            "high_sensitivity": point, "high_specificity": point}


def _manifest(fmt: str = "fracatlas", **held_out: Any) -> dict[str, Any]:
    return {"name": "fractured", "version": "9.0.0", "trained": True,
            "classifier": {"architecture": "a", "variant": "lite0", "input_size": 256,
                           "labels": ["fracture"], "temperature": 1.0,
                           "operating_points": {"high_sensitivity": 0.2,
                                                "high_specificity": 0.7}},
            "detector": None, "mean": [0.5] * 3, "std": [0.2] * 3,
            "training": {"classifier": {"data": {"format": fmt}},
                         "held_out": {"split": "test", "classification": {}, **held_out}}}


def test_each_region_says_how_many_fractures_its_figures_rest_on() -> None:
    node = {"gate": "likely", "validation_and_test": {"images": 500, "regions": {
        "hand": _row(90, 84, 300), "hip": _row(3, 2, 40)}}}
    text = "\n".join(scope(_manifest(node=node)))
    assert "| hand | HAND, WRIST, FINGER, THUMB | 90 / 300 | sensitivity 0.93 (" in text
    assert "| hip | HIP, PELVIS | 3 / 40 | little: too few fractures; sensitivity could " \
           "be anywhere in 0.09-0.99 |" in text
    assert "| shoulder | " in text and "none measured" in text  # no images of it
    assert f"fewer than {FEW_FRACTURES} fractures" in text
    assert "**Adults only.**" in text
    assert "**This bundle declares no intended use**" in text
    declared = _manifest(node=node)
    declared["intended_use"] = {"body_parts": ["HAND", "WRIST"], "min_age_years": 18}
    text = "\n".join(scope(declared))
    assert "**The node analyses only** images whose Body Part Examined is one of HAND, " \
           "WRIST, of patients at least 18 years old" in text
    # hip is outside this intended use: its few figures are shown, and it is not analysed
    assert "| hip | HIP, PELVIS | 3 / 40 | not analysed: outside the intended use |" in text
    assert "| hand | HAND, WRIST, FINGER, THUMB | 90 / 300 | sensitivity 0.93 (" in text
    assert "three hospitals in Bangladesh" in text and "**Growth plates**" in text


def test_a_data_set_of_unknown_origin_says_nothing_is_known() -> None:
    text = "\n".join(scope(_manifest(fmt="csv")))
    assert "## Source population" not in text
    assert "None recorded for `csv` data" in text
    assert "none measured" in text  # no held-out assessment: no region is measured


def test_the_card_counts_the_test_parts_looks_and_cites_the_dicom_check() -> None:
    first = model_card(_manifest(test_looks_before=0), [])
    assert "This was the first scoring of this test part." in first
    manifest = _manifest(test_looks_before=19)
    manifest["training"]["dicom_check"] = {
        "bundle": "fractured-9.0.0", "part": "val", "images": 120, "tolerance": 0.05,
        "tolerance_share": 0.95, "passed": True,
        "variants": [{"variant": "windowed", "mean_abs_change": 0.003,
                      "p95_abs_change": 0.013, "max_abs_change": 0.04,
                      "within_tolerance": 1.0, "decisions_changed": 2}]}
    card = model_card(manifest, [])
    assert "had been scored 19 times before these figures" in card
    assert "which this model meets" in card
    assert "| windowed | 0.003 | 0.013 | 0.040 | 100 % | 2 |" in card
    assert "## Where it may be used" in card
    untrained = {**_manifest(), "trained": False}
    assert "## Where it may be used" not in model_card(untrained, [])


def test_the_region_check_says_how_its_threshold_was_chosen() -> None:
    """A threshold chosen out of fold is stated as such, with the folds' spread and the
    floor; one chosen on a validation part (bundles before 2026-12-07) as that."""
    scores = {"images": 2700, "accepted": 0.9861, "region_accuracy": 0.95,
              "region_images": 2700, "per_class": {"hand": {"images": 900, "correct": 880}}}
    declared = _manifest()
    check = {"classes": ["hand", "leg"], "threshold": 3100.0,
             "backbone": "imagenet:efficientnet-lite0"}
    declared["intended_use"] = {"body_parts": ["HAND"], "min_age_years": 18,
                                "region_check": {**check, "validation": {
                                    **scores, "accepted_by_fold": [0.981, 0.992],
                                    "accepted_floor": 0.98,
                                    "per_class": {"hand": {"images": 900, "correct": 880,
                                                           "accepted": 893}}}}}
    text = "\n".join(scope(declared))
    assert ("a distance that 98.6% of the 2700 train and val images are within, each "
            "measured by a fit without its fold, 2 folds from 98.1% to 99.2%: the threshold "
            "is where the exact 95 % interval of that share stays at or above 98%") in text
    assert "Out of fold its region was the labelled one on 95.0% of 2700 images" in text
    assert "Accepted, by labelled region: hand 893/900." in text
    declared["intended_use"]["region_check"]["validation"] = scores
    text = "\n".join(scope(declared))
    assert "which 98.6% of the 2700 validation images are within" in text
    assert "On validation its region was the labelled one on 95.0%" in text
    assert "Accepted, by labelled region" not in text  # not recorded before 2026-12-07


def test_the_card_says_what_the_node_does_with_anatomy_the_data_lacked() -> None:
    """A chest film gets a score from a bundle that declares nothing, no verdict from
    one whose header check or region check turns it away: the card says which."""
    unseen = "- **Projections and anatomy not in the data**: skull, spine, chest, ribs"
    manifest = _manifest()
    text = "\n".join(scope(manifest))
    assert unseen in text and "declares no intended use, so the node still scores them" in text
    assert "an image it cannot place is scored with the pooled operating points" in text
    manifest["intended_use"] = {"body_parts": ["HAND"], "min_age_years": 18}
    text = "\n".join(scope(manifest))
    assert "names one gets no verdict, but one without a usable body part is scored" in text
    assert "still scores them" not in text
    manifest["intended_use"]["region_check"] = {
        "classes": ["hand", "leg"], "threshold": 3100.0,
        "backbone": "imagenet:efficientnet-lite0",
        "validation": {"images": 10, "accepted": 1.0, "region_accuracy": None,
                       "region_images": 0}}
    text = "\n".join(scope(manifest))
    assert "gets none where the region check finds it unlike the training images" in text
    assert "an image it cannot place gets no verdict." in text
    assert "is scored, with the pooled points" not in text
    assert unseen not in "\n".join(scope(_manifest(fmt="csv")))  # nothing known of csv
