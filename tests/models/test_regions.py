"""Operating points per body region: fitted on each region's validation images (with a
specificity floor and a minimum of cases), kept in the manifest, validated by name,
applied by the pipeline from Body Part Examined, carried by calibration, build-engine,
fuse and quantize, shown in the model card.

The SR and overlay citing them are checked with dciodvfy in test_results.py.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from fractured.config import ConfigError
from fractured.engine.bundle import (
    BY_REGION,
    CLASSIFIER_FILE,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Bundle,
    BundleError,
    Fusion,
)
from fractured.engine.findings import ImageRef, OperatingPoints
from fractured.engine.models import FractureClassifier
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import display_pixels
from fractured.engine.regions import POOLED, Region, dataset_region, region_of
from fractured.predict import Prediction, to_json
from fractured.training import checkpoint, config
from fractured.training.build import (
    build_bundle,
    build_fused_bundle,
    build_quantized_bundle,
)
from fractured.training.classifier import _metadata, calibrate
from fractured.training.data import ClassifierImages, letterbox_samples
from fractured.training.datasets import open_dataset
from fractured.training.datasets.base import Sample
from fractured.training.evaluation import (
    RegionRule,
    choose_operating_points,
    choose_region_operating_points,
)
from fractured.training.evaluation.calibration import (
    expected_flag_rates,
    fit_region_points,
    points_rule,
)
from fractured.training.export import IMAGENET_MEAN, IMAGENET_STD
from fractured.training.fusion import FusionResult, fuse
from fractured.training.loops import Device
from fractured.training.quantize import QuantizationResult
from fractured.training.splits import make_split, write_split
from tests.factory import dx_study

RULE = RegionRule(min_fractures=20, min_normals=30, min_specificity=0.40)
#: the untrained bundle's pooled points (build_untrained_bundle's placeholders)
POOLED_POINTS = OperatingPoints(0.4, 0.6)


def scores(fractures: list[float], normals: list[float]) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([1] * len(fractures) + [0] * len(normals)),
            np.array(fractures + normals, dtype=np.float64))


# Hands: normals score high and two fractures score low, so the 0.95 sensitivity target
# (the 29th of 30 fractures) would sit below every normal: the floor must bind.
HAND = scores([0.10, 0.12, *np.linspace(0.6, 0.95, 28)], list(np.linspace(0.2, 0.8, 40)))
# Legs: enough cases, separable enough that the targets leave specificity above the floor.
LEG = scores(list(np.linspace(0.3, 0.9, 25)), list(np.linspace(0.05, 0.5, 40)))
# Hips: too few fractures for points of their own.
HIP = scores(list(np.linspace(0.5, 0.9, 5)), list(np.linspace(0.1, 0.6, 50)))
# "mixed" images have no region: they count for the pooled points only.
MIXED = scores(list(np.linspace(0.2, 0.9, 10)), list(np.linspace(0.1, 0.7, 10)))
PARTS = {"hand": HAND, "wrist": None, "leg": LEG, "hip": HIP, "mixed": MIXED}


def validation() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Labels, probabilities and training body-part labels of all the parts above."""
    labels, probs, parts = [], [], []
    for name, part in PARTS.items():
        if part is not None:
            labels.append(part[0])
            probs.append(part[1])
            parts += [name] * len(part[0])
    return np.concatenate(labels), np.concatenate(probs), parts


def fitted(rule: RegionRule = RULE, pooled: OperatingPoints = POOLED_POINTS):
    labels, probs, parts = validation()
    return choose_region_operating_points(labels, probs, [region_of(p) for p in parts],
                                          pooled, rule)


# -- the regions -----------------------------------------------------------------------------


@pytest.mark.parametrize(("term", "region"), [
    ("HAND", Region.HAND), ("WRIST", Region.HAND), ("thumb", Region.HAND),
    (" FINGER ", Region.HAND), ("ANKLE", Region.LEG), ("FEMUR", Region.LEG),
    ("leg", Region.LEG), ("PELVIS", Region.HIP), ("hip", Region.HIP),
    ("CLAVICLE", Region.SHOULDER), ("humerus", Region.SHOULDER),
    ("ELBOW", None), ("FOREARM", None), ("CHEST", None), ("mixed", None), ("", None),
])
def test_body_part_terms_and_training_labels_map_to_their_region(
        term: str, region: Region | None) -> None:
    assert region_of(term) is region


def test_a_dicom_image_without_a_body_part_has_no_region() -> None:
    (ds,) = dx_study(1)
    assert dataset_region(ds) is Region.LEG  # the factory's images are legs
    del ds.BodyPartExamined
    assert dataset_region(ds) is None and dataset_region(None) is None


# -- fitting ---------------------------------------------------------------------------------


def test_a_region_with_enough_cases_gets_points_of_its_own_meeting_the_targets() -> None:
    leg = fitted()[Region.LEG]
    labels, probs = LEG
    own, _ = choose_operating_points(labels, probs)  # the same targets, on legs alone
    assert (leg.source, leg.points) == ("region", own)
    assert leg.points != choose_operating_points(*validation()[:2])[0]  # not the pooled
    fit = leg.fitted_on
    assert (fit.fractures, fit.normals, fit.floor_applied) == (25, 40, False)
    assert fit.high_sensitivity.sensitivity >= 0.95
    assert fit.high_specificity.specificity >= 0.90
    assert fit.high_sensitivity.specificity >= RULE.min_specificity
    called = probs >= leg.high_sensitivity
    assert fit.high_sensitivity.sensitivity == called[labels == 1].mean()
    assert fit.high_sensitivity.specificity == (~called[labels == 0]).mean()


def test_the_floor_raises_the_sensitive_point_and_records_the_sensitivity_reached() -> None:
    labels, probs = HAND
    unfloored = fitted(RegionRule(20, 30, 0.0))[Region.HAND]
    assert not unfloored.fitted_on.floor_applied
    assert unfloored.fitted_on.high_sensitivity.specificity < 0.40  # what the floor stops
    hand = fitted()[Region.HAND]
    fit = hand.fitted_on
    assert hand.source == "region" and fit.floor_applied
    normals = probs[labels == 0]
    assert (normals < hand.high_sensitivity).mean() >= 0.40
    # the tightest threshold that keeps the floor: the next score down would break it
    lower = probs[probs < hand.high_sensitivity].max()
    assert (normals < lower).mean() < 0.40
    assert fit.high_sensitivity.sensitivity == (probs[labels == 1] >=
                                                hand.high_sensitivity).mean() < 0.95
    # the high-specificity point is the targets' as ever, and still above
    assert hand.high_specificity == unfloored.high_specificity >= hand.high_sensitivity
    assert fit.high_specificity.specificity >= 0.90


def test_a_region_with_too_few_cases_keeps_the_pooled_points_and_says_so() -> None:
    chosen = fitted()
    assert list(chosen) == [Region.HAND, Region.LEG, Region.HIP]  # none for "mixed"
    hip = chosen[Region.HIP]
    labels, probs = HIP
    assert (hip.source, hip.points) == (POOLED, POOLED_POINTS)
    fit = hip.fitted_on
    assert (fit.fractures, fit.normals, fit.floor_applied) == (5, 50, False)
    assert fit.high_sensitivity.sensitivity == (probs[labels == 1] >= 0.4).mean()
    assert fit.high_specificity.specificity == (probs[labels == 0] < 0.6).mean()
    # one more fracture short of the minimum for legs too
    assert fitted(RegionRule(26, 30, 0.4))[Region.LEG].source == POOLED


def test_no_region_in_the_data_fits_nothing_and_bad_input_is_refused() -> None:
    labels, probs = MIXED
    assert fit_region_points(labels, probs, ["mixed"] * len(labels), POOLED_POINTS, RULE,
                             sensitivity=0.95, specificity=0.9) == {}
    assert fit_region_points(labels, probs, [""] * len(labels), POOLED_POINTS, RULE,
                             sensitivity=0.95, specificity=0.9) == {}
    with pytest.raises(ValueError, match="regions for"):
        choose_region_operating_points(labels, probs, [None], POOLED_POINTS, RULE)
    with pytest.raises(ValueError, match="specificity floor"):
        choose_region_operating_points(labels, probs, [None] * len(labels), POOLED_POINTS,
                                       RegionRule(20, 30, 0.95), specificity=0.9)


@pytest.mark.parametrize(("flag", "key"), [
    ("classifier.region_min_specificity=0.95", "region_min_specificity"),
    ("classifier.region_min_specificity=-0.1", "region_min_specificity"),
    ("classifier.region_min_fractures=0", "region_min_fractures"),
    ("classifier.region_min_normals=0", "region_min_normals"),
])
def test_bad_region_settings_name_their_key(flag: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[classifier\]\.{key}"):
        config.load(None, [flag])


# -- the manifest ----------------------------------------------------------------------------


def with_regions(bundle: Path, target: Path, by_region: Any) -> Path:
    """A copy of `bundle` whose manifest has `by_region` (manifest.json is not among the
    checksummed files, so the copy loads)."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["classifier"][BY_REGION] = by_region
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


def fitted_manifest() -> dict[str, Any]:
    labels, probs, parts = validation()
    return fit_region_points(labels, probs, parts, POOLED_POINTS, RULE, sensitivity=0.95,
                             specificity=0.9)


def test_fitted_points_are_read_and_written_back_as_they_are(untrained_bundle: Path,
                                                             tmp_path: Path) -> None:
    path = with_regions(untrained_bundle, tmp_path / "b", fitted_manifest())
    manifest = Bundle.load(path).manifest
    by_region = manifest.classifier.operating_points_by_region
    assert by_region is not None and list(by_region) == [Region.HAND, Region.LEG, Region.HIP]
    assert by_region[Region.HAND].fitted_on.floor_applied
    assert manifest.to_dict() == json.loads((path / MANIFEST_FILE).read_text())
    assert Bundle.load(untrained_bundle).manifest.classifier.operating_points_by_region is None
    assert BY_REGION not in Bundle.load(untrained_bundle).manifest.to_dict()["classifier"]


def _entry(**change: Any) -> dict[str, Any]:
    entry = fitted_manifest()["leg"]
    entry.update(change)
    return entry


@pytest.mark.parametrize(("by_region", "key"), [
    ({"elbow": _entry()}, "classifier.operating_points_by_region.elbow"),
    ({"mixed": _entry()}, "classifier.operating_points_by_region.mixed"),
    ({}, "classifier.operating_points_by_region"),
    ([_entry()], "classifier.operating_points_by_region"),
    ({"leg": _entry(high_sensitivity=0)}, "classifier.operating_points_by_region.leg."
                                          "high_sensitivity"),
    ({"leg": _entry(high_specificity=1.0)}, "classifier.operating_points_by_region.leg."
                                            "high_specificity"),
    ({"leg": _entry(high_sensitivity=0.7, high_specificity=0.6)},
     "classifier.operating_points_by_region.leg.high_specificity"),
    ({"leg": _entry(source="own")}, "classifier.operating_points_by_region.leg.source"),
    ({"leg": _entry(source="pooled")}, "classifier.operating_points_by_region.leg.source"),
    ({"leg": _entry(colour="blue")}, "classifier.operating_points_by_region.leg.colour"),
    ({"leg": {k: v for k, v in _entry().items() if k != "fitted_on"}},
     "classifier.operating_points_by_region.leg.fitted_on"),
    ({"leg": _entry(fitted_on={**_entry()["fitted_on"], "fractures": -1})},
     "classifier.operating_points_by_region.leg.fitted_on.fractures"),
    ({"leg": _entry(fitted_on={**_entry()["fitted_on"], "floor_applied": "no"})},
     "classifier.operating_points_by_region.leg.fitted_on.floor_applied"),
    ({"leg": _entry(fitted_on={**_entry()["fitted_on"],
                               "high_sensitivity": {"sensitivity": 1.5, "specificity": 0.5}})},
     "classifier.operating_points_by_region.leg.fitted_on.high_sensitivity.sensitivity"),
])
def test_bad_points_per_region_are_refused_naming_the_key(
        untrained_bundle: Path, tmp_path: Path, by_region: Any, key: str) -> None:
    path = with_regions(untrained_bundle, tmp_path / "b", by_region)
    with pytest.raises(BundleError, match=rf"manifest\.json.*'{key}'"):
        Bundle.load(path)


# -- the pipeline ------------------------------------------------------------------------------


def own_points(high_sensitivity: float, high_specificity: float) -> dict[str, Any]:
    """A region entry of its own with the given thresholds (a plausible record)."""
    reached = {"sensitivity": 0.9, "specificity": 0.5}
    return {"high_sensitivity": high_sensitivity, "high_specificity": high_specificity,
            "source": "region",
            "fitted_on": {"fractures": 40, "normals": 90, "high_sensitivity": reached,
                          "high_specificity": reached, "floor_applied": False}}


@pytest.fixture
def regional_pipeline(untrained_bundle: Path, tmp_path: Path) -> Pipeline:
    hip = {**own_points(0.4, 0.6), "source": "pooled"}
    path = with_regions(untrained_bundle, tmp_path / "regional",
                        {"hand": own_points(0.001, 0.002), "leg": own_points(0.998, 0.999),
                         "hip": hip})
    return Pipeline(Bundle.load(path))


def run_on(pipeline: Pipeline, body_part: str | None):
    (ds,) = dx_study(1)
    if body_part is None:
        del ds.BodyPartExamined
    else:
        ds.BodyPartExamined = body_part
    ref = ImageRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                   ds.SOPClassUID)
    (finding,) = pipeline.run([(ref, display_pixels(ds))], [ds])
    return finding


def test_an_image_of_a_region_gets_its_points_and_says_whose(
        regional_pipeline: Pipeline) -> None:
    for part in ("HAND", "WRIST"):
        hand = run_on(regional_pipeline, part)
        assert hand.operating_points == OperatingPoints(0.001, 0.002)
        assert hand.operating_region is Region.HAND
    leg = run_on(regional_pipeline, "LEG")
    assert leg.operating_points == OperatingPoints(0.998, 0.999)
    assert leg.operating_region is Region.LEG
    # the untrained model's probability lies between: the region decides the verdict
    assert hand.probability == pytest.approx(leg.probability)
    assert hand.fracture and not leg.fracture


@pytest.mark.parametrize("body_part", [None, "", "ELBOW", "PELVIS"])
def test_an_image_of_no_region_or_of_a_fallback_region_gets_the_pooled_points(
        regional_pipeline: Pipeline, body_part: str | None) -> None:
    finding = run_on(regional_pipeline, body_part)
    assert finding.operating_points == POOLED_POINTS
    assert finding.operating_region == POOLED


def test_predict_json_names_the_points_that_decided_and_whose(
        regional_pipeline: Pipeline, untrained_bundle: Path) -> None:
    def points(pipeline: Pipeline, body_part: str) -> dict[str, Any]:
        finding = run_on(pipeline, body_part)
        return to_json(Prediction(Path("x.dcm"), None, finding))[  # type: ignore[arg-type]
            "operating_points"]

    assert points(regional_pipeline, "HAND") == {
        "high_sensitivity": 0.001, "high_specificity": 0.002, "region": "hand"}
    assert points(regional_pipeline, "ELBOW")["region"] == "pooled"
    plain = points(Pipeline(Bundle.load(untrained_bundle)), "HAND")
    assert plain["region"] is None  # a bundle with the pooled pair only cites no one


def test_a_bundle_without_regions_decides_and_records_as_before(untrained_bundle: Path) -> None:
    finding = run_on(Pipeline(Bundle.load(untrained_bundle)), "HAND")
    assert finding.operating_points == POOLED_POINTS and finding.operating_region is None


# -- calibration and build-engine ------------------------------------------------------------


def write_images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True)
    paths = []
    for index in range(n):
        rng = np.random.default_rng(index)
        picture = cv2.GaussianBlur(rng.random((72, 64)).astype(np.float32), (0, 0), 3)
        paths.append(root / f"img{index:03d}.png")
        cv2.imwrite(str(paths[-1]), (255 * picture / picture.max()).astype(np.uint8))
    return paths


@pytest.mark.slow
def test_calibration_fits_regions_and_build_engine_carries_them_into_the_bundle(
        untrained_bundle: Path, tmp_path: Path) -> None:
    """A finished classifier checkpoint (random weights, no epoch needed) calibrated on
    validation images of three body parts: the region with enough cases gets its own
    points, the one without keeps the pooled, "mixed" none; the bundle and its card
    carry them; a data set without body parts writes none."""
    settings = config.load(None, ["classifier.input_size=32", "classifier.region_min_fractures=6",
                                  "classifier.region_min_normals=6", "run.workers=0"])
    cfg = settings.classifier
    paths = write_images(tmp_path / "images", 40)
    parts = ["hand"] * 20 + ["leg"] * 10 + ["mixed"] * 10
    samples = [Sample(path, index % 2, part)
               for index, (path, part) in enumerate(zip(paths, parts, strict=True))]
    best = tmp_path / "run" / "classifier" / checkpoint.BEST
    best.parent.mkdir(parents=True)
    network = FractureClassifier(variant="b0", num_labels=1)
    checkpoint.save(best, {**_metadata(cfg, 32, settings, {"dataset": str(tmp_path)}),
                           "model": network.state_dict(), "epoch": 0, "metrics": {}})
    device = Device.choose("cpu", amp=False, channels_last=False)

    def val_set(chosen: list[Sample]) -> ClassifierImages:
        return ClassifierImages(letterbox_samples(chosen, 32), mean=IMAGENET_MEAN,
                                std=IMAGENET_STD)

    calibrate(best, val_set(samples), cfg, device, 0)
    calibration = checkpoint.load(best)["calibration"]
    by_region = calibration[BY_REGION]
    assert list(by_region) == ["hand", "leg"]
    assert by_region["hand"]["source"] == "region"
    assert by_region["hand"]["fitted_on"]["fractures"] == 10
    assert by_region["leg"]["source"] == POOLED
    assert (by_region["leg"]["high_sensitivity"], by_region["leg"]["high_specificity"]) == \
        (calibration["operating_points"]["high_sensitivity"],
         calibration["operating_points"]["high_specificity"])

    out = build_bundle([best], tmp_path / "engines" / "regional", name="fractured-regions",
                       version="0.0.1", tensorrt=False)
    manifest = Bundle.load(out).manifest
    assert manifest.to_dict()["classifier"][BY_REGION] == by_region
    # the shares flagged per region go with them, for the node's drift watch
    rates = manifest.classifier.expected_flag_rates
    assert rates is not None and set(rates) <= {"hand", "leg", "hip", "shoulder", "other"}
    assert sum(rate.images for rate in rates.values()) == calibration["val_images"]
    card = (out / MODEL_CARD_FILE).read_text()
    assert "## Operating points per body region" in card
    assert "| hand | own" in card and "| leg | pooled (too few cases)" in card
    assert "HAND, WRIST, FINGER, THUMB" in card

    calibrate(best, val_set([Sample(s.path, s.label, "") for s in samples]), cfg, device, 0)
    assert BY_REGION not in checkpoint.load(best)["calibration"]


# -- fuse and quantize -----------------------------------------------------------------------


def _report(path: Path) -> tuple[dict[str, Any], Path]:
    """The least of a held-out report that a derived bundle's record reads."""
    return {"data": {"split": "test", "images": 2, "fracture": 1, "unreadable": []},
            "classification": {}}, path


def test_quantize_keeps_the_sources_points_per_region(untrained_bundle: Path,
                                                      tmp_path: Path) -> None:
    source = Bundle.load(with_regions(untrained_bundle, tmp_path / "src", fitted_manifest()))
    report, report_path = _report(tmp_path / "metrics.json")
    result = QuantizationResult(source=source,
                                files={CLASSIFIER_FILE: source.file(CLASSIFIER_FILE)},
                                summary={"source": "x", "models": ["classifier"]},
                                report=report, report_path=report_path)
    out = build_quantized_bundle(result, tmp_path / "int8", version="0.0.2")
    new = Bundle.load(out).manifest
    assert new.classifier.operating_points_by_region == \
        source.manifest.classifier.operating_points_by_region
    assert "| hand | own, floor" in (out / MODEL_CARD_FILE).read_text()


def test_a_fusion_without_regions_drops_the_sources_points_per_region(
        untrained_bundle_with_detector: Path, tmp_path: Path) -> None:
    """The source's were fitted on the unfused probability: they never carry over."""
    source = Bundle.load(with_regions(untrained_bundle_with_detector, tmp_path / "src",
                                      fitted_manifest()))
    report, report_path = _report(tmp_path / "metrics.json")
    weights = {"logit_weight": 1.0, "box_weight": 0.5, "intercept": 0.0}
    result = FusionResult(source=source, fusion=Fusion(**weights),
                          operating_points={"high_sensitivity": 0.3, "high_specificity": 0.7},
                          operating_points_by_region={}, expected_flag_rates={},
                          summary={"weights": weights}, report=report,
                          report_path=report_path)
    out = build_fused_bundle(result, tmp_path / "fused", version="0.0.2")
    classifier = Bundle.load(out).manifest.classifier
    assert classifier.fusion == Fusion(**weights)
    assert classifier.operating_points_by_region is None
    assert classifier.expected_flag_rates is None


@pytest.fixture
def regional_split(scored_bundle, tmp_path: Path) -> tuple[Path, Path, Path]:
    """`scored_bundle`'s images as a FracAtlas copy whose images are hands, legs and
    "mixed", its split, and the bundle recorded as trained on it (its region settings
    low enough for hands to have points of their own), with stale hand points."""
    yolo, _, bundle = scored_bundle
    root = tmp_path / "fracatlas"
    shutil.copytree(yolo / "images", root / "images")
    shutil.copytree(yolo / "labels", root / "labels")
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "body_part", "hardware", "n_boxes"])
        for index, image in enumerate(sorted((root / "images").iterdir())):
            boxes = len((root / "labels" / f"{image.stem}.txt").read_text().splitlines())
            writer.writerow([image.name, "fractured" if boxes else "not_fractured",
                             ("hand", "hand", "leg", "mixed")[index % 4], "0", boxes])
    sample_set = open_dataset(root, None)
    split = make_split(sample_set, val=0.4, test=0.2, seed=0)
    write_split(split, tmp_path / "split")
    parts = {name: split.samples(sample_set, name) for name in ("train", "val")}
    source = tmp_path / "engines" / "fractured-1.0.0"
    shutil.copytree(bundle, source)
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    record = manifest["training"]["classifier"]
    record["data"] = {"dataset": str(root), "format": sample_set.format,
                      "images": len(sample_set.samples),
                      **{f"{name}_images": len(part) for name, part in parts.items()},
                      **{f"{name}_positive": sum(s.label for s in part)
                         for name, part in parts.items()}}
    record["settings"] = {**record["settings"], "region_min_fractures": 2,
                          "region_min_normals": 2, "region_min_specificity": 0.4}
    manifest["classifier"][BY_REGION] = {"hand": own_points(0.001, 0.002)}
    (source / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root, tmp_path / "split", source


@pytest.mark.slow
def test_fuse_fits_the_points_per_region_again_on_the_fused_probability(
        regional_split, tmp_path: Path) -> None:
    _, split_dir, source = regional_split
    result = fuse(source, split_dir, tmp_path / "report", bootstrap=0)
    with open(tmp_path / "report" / "validation.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = np.array([int(row["label"]) for row in rows])
    fused = np.array([float(row["probability"]) for row in rows])
    pooled = OperatingPoints(**result.operating_points)
    expected = fit_region_points(labels, fused, [row["body_part"] for row in rows], pooled,
                                 RegionRule(2, 2, 0.4), sensitivity=0.95, specificity=0.9)
    assert set(expected) == {"hand", "leg"} and expected["hand"]["source"] == "region"
    # validation.csv keeps 6 decimals: the thresholds agree to those
    assert flat(result.operating_points_by_region) == pytest.approx(flat(expected), abs=1e-5)
    out = build_fused_bundle(result, tmp_path / "fused", version="1.1.0")
    written = json.loads((out / MANIFEST_FILE).read_text())["classifier"][BY_REGION]
    assert written == result.operating_points_by_region
    assert written["hand"]["high_sensitivity"] > 0.1  # not the source's stale 0.001
    # the shares flagged on validation, each image at its region's fused points
    rates = Bundle.load(out).manifest.classifier.expected_flag_rates
    parts = [row["body_part"] for row in rows]
    hands = np.array([part == "hand" for part in parts])
    hand_points = written["hand"]
    assert rates["hand"].images == hands.sum()
    # (validation.csv's 6 decimals may move an image sitting on the threshold)
    assert rates["hand"].high_sensitivity == pytest.approx(
        (fused[hands] >= hand_points["high_sensitivity"]).mean(), abs=1.01 / hands.sum())
    assert rates["hand"].high_sensitivity == result.expected_flag_rates["hand"][
        "high_sensitivity"]


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested manifest record as {dotted key: value}, numbers comparable with approx
    (bools and strings as 0/1 and hashes, which approx compares exactly)."""
    if isinstance(tree, dict):
        return {key: value for name, item in tree.items()
                for key, value in flat(item, f"{prefix}{name}.").items()}
    value = float(tree) if isinstance(tree, int | float) else hash(tree)
    return {prefix: value}


def test_expected_flag_rates_decide_each_image_at_its_regions_points() -> None:
    probs = [0.05, 0.2, 0.6, 0.95, 0.2, 0.6, 0.95, 0.5]
    parts = ["hand", "hand", "hand", "hand", "leg", "leg", "leg", "mixed"]
    by_region = {"hand": own_points(0.1, 0.9),
                 "leg": {**own_points(0.01, 0.02), "source": "pooled"}}
    pooled = {"high_sensitivity": POOLED_POINTS.high_sensitivity,
              "high_specificity": POOLED_POINTS.high_specificity}
    rates = expected_flag_rates(probs, parts, points_rule(pooled, by_region))
    assert rates["hand"] == {"images": 4, "high_sensitivity": 0.75, "high_specificity": 0.25}
    # leg falls back to the pooled 0.4 / 0.6; mixed has no region: "other", pooled
    assert rates["leg"] == {"images": 3, "high_sensitivity": 2 / 3,
                            "high_specificity": 2 / 3}
    assert rates["other"] == {"images": 1, "high_sensitivity": 1.0, "high_specificity": 0.0}
    assert set(rates) == {"hand", "leg", "other"}  # no hip or shoulder image


@pytest.mark.parametrize(("rates", "message"), [
    ({"knee": {"images": 3, "high_sensitivity": 0.5, "high_specificity": 0.1}},
     "expected_flag_rates.knee"),
    ({"hand": {"images": 3, "high_sensitivity": 1.5, "high_specificity": 0.1}},
     "expected_flag_rates.hand.high_sensitivity"),
    ({"hand": {"images": 3, "high_sensitivity": 0.5}},
     "expected_flag_rates.hand.high_specificity"),
])
def test_bad_expected_flag_rates_are_refused_naming_the_key(
        untrained_bundle: Path, tmp_path: Path, rates: dict, message: str) -> None:
    copy = Path(shutil.copytree(untrained_bundle, tmp_path / "b"))
    manifest = json.loads((copy / MANIFEST_FILE).read_text())
    manifest["classifier"]["expected_flag_rates"] = rates
    (copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=re.escape(message)):
        Bundle.load(copy)
