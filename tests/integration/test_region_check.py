"""The region check: where an image's header cannot say what it shows, its pixels do.

Fitted here on drawn images of two "regions" (thin parallel bones for a hand, one thick
bone for a leg) with the ImageNet EfficientNet-Lite0 of the `train` extra, exported to
ONNX and run by the pipeline, predict and the node; a drawing of ribs stands for the
chest film nobody trained it on.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fractured.cli import main
from fractured.engine.bundle import MANIFEST_FILE, Bundle, BundleError
from fractured.engine.exposed_field import EXPOSED_FIELD
from fractured.engine.findings import ImageRef
from fractured.engine.intended_use import IntendedUse, ScopeReason
from fractured.engine.pipeline import Pipeline
from fractured.engine.region_check import REGION_CHECK_FILE, RegionCheck, RegionSeen
from fractured.engine.regions import Region
from fractured.training import region_check
from fractured.training.region_check import (
    ACCEPTED,
    check_parity,
    export,
    fit,
    imagenet_features,
    threshold,
)
from tests import factory
from tests.integration.test_metrics import get, parse, value
from tests.peers import NodeProcess, dciodvfy, wait_for

SIZE = 128  # the untrained bundle's input size
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def drawing(kind: str, seed: int, size: int = SIZE) -> np.ndarray:
    """A grey image of `kind`: "hand" (3-5 thin vertical bones), "leg" (one thick
    slanted bone) or "chest" (curved ribs either side of a spine)."""
    rng = np.random.default_rng(seed)
    image = np.full((size, size), 0.15, np.float32) + rng.normal(0, 0.03, (size, size))
    bone = float(rng.uniform(0.7, 0.9))
    if kind == "hand":
        for _ in range(int(rng.integers(3, 6))):
            x = int(rng.integers(15, size - 15))
            cv2.line(image, (x, int(rng.integers(5, 30))), (x + int(rng.integers(-8, 8)),
                     size - int(rng.integers(5, 30))), bone, int(rng.integers(3, 6)))
    elif kind == "leg":
        x = int(rng.integers(40, size - 40))
        cv2.line(image, (x + int(rng.integers(-20, 20)), 0),
                 (x + int(rng.integers(-20, 20)), size), bone, int(rng.integers(14, 22)))
    else:
        cv2.line(image, (size // 2, 0), (size // 2, size), bone, 8)
        for y in range(10, size - 10, int(rng.integers(12, 17))):
            for side in (-1, 1):
                cv2.ellipse(image, (size // 2, y), (int(size * 0.4), 14), 0,
                            0 if side > 0 else 180, 90 if side > 0 else 270, bone, 3)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def drawings(kind: str, count: int, first_seed: int) -> list[np.ndarray]:
    return [drawing(kind, first_seed + i) for i in range(count)]


LIMBS = IntendedUse.for_regions([Region.HAND, Region.LEG])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RegionCheck]:
    """(graph, manifest entry) of a check fitted on 65 drawings per region, its
    threshold chosen by 5-fold cross-validation over them."""
    images = drawings("hand", 65, 0) + drawings("leg", 65, 100)
    parts = ["wrist"] * 25 + ["hand"] * 40 + ["leg"] * 65
    folds = [i % 5 for i in range(len(images))]
    model = fit(imagenet_features(), images, parts, folds, mean=MEAN, std=STD)
    graph = tmp_path_factory.mktemp("region") / REGION_CHECK_FILE
    export(model.net, graph, SIZE)
    assert check_parity(model.net, graph, drawings("hand", 3, 500) + drawings("chest", 3, 600),
                        mean=MEAN, std=STD, tolerance=region_check.PARITY_TOLERANCE) < 1e-3
    return graph, threshold(model)


def test_it_accepts_the_fitting_images_out_of_fold_and_knows_their_regions(
        fitted: tuple[Path, RegionCheck]) -> None:
    _, check = fitted
    assert check.classes == ("hand", "leg")  # only classes with training images
    assert check.validation["images"] == 130
    # 130 images cannot show 99 % at the lower end of an exact interval: all accepted
    assert check.validation["accepted"] == 1.0
    assert check.validation["accepted_by_fold"] == [1.0] * 5
    assert check.validation["region_accuracy"] == 1.0
    assert check.validation["per_class"] == {
        "hand": {"images": 65, "correct": 65, "accepted": 65},
        "leg": {"images": 65, "correct": 65, "accepted": 65}}
    assert check.validation["method"].startswith("5-fold cross-validation")


def test_the_threshold_accepts_99_percent_at_the_lower_end_of_its_interval() -> None:
    """With enough held-out images the threshold is the fewest accepted whose exact
    interval stays above the floor: one image fewer would not show it. The floor is
    what makes a held-out part of 480 images show issue 27's 98 % with 95 %
    probability, which 98 % itself does not."""
    from fractured.training.evaluation.classification import clopper_pearson

    def shows_98_percent(share: float, n: int = 480) -> float:  # P(at most 2 % refused)
        return sum(math.comb(n, k) * (1 - share) ** k * share ** (n - k)
                   for k in range(int(0.02 * n) + 1))

    assert shows_98_percent(ACCEPTED) >= 0.95 > shows_98_percent(0.98)

    nearest = np.random.default_rng(0).gamma(4.0, 1.0, 2737)
    limit = region_check.chosen_threshold(nearest)
    accepted = int((nearest <= limit).sum())
    assert clopper_pearson(accepted, len(nearest))[0] >= ACCEPTED
    assert clopper_pearson(accepted - 1, len(nearest))[0] < ACCEPTED
    assert 0.99 < accepted / len(nearest) < 0.995


def test_it_refuses_what_it_never_saw_and_places_what_it_did(
        fitted: tuple[Path, RegionCheck]) -> None:
    graph, check = fitted
    from fractured.engine.backends.onnxruntime import OnnxRuntimeRegionCheck
    from fractured.engine.preprocess import to_model_input

    runner = OnnxRuntimeRegionCheck(graph)
    chests = runner.run(to_model_input(drawings("chest", 10, 700), MEAN, STD))
    assert all(not check.nearest(row).familiar for row in chests)
    hands = runner.run(to_model_input(drawings("hand", 10, 800), MEAN, STD))
    seen = [check.nearest(row) for row in hands]
    assert [s.region for s in seen] == [Region.HAND] * 10
    # the threshold holds every held-out drawing; 130 fitting drawings leave
    # new ones of the same kind a little farther, but far nearer than any chest
    assert sum(s.familiar for s in seen) >= 6
    assert max(s.distance for s in seen) < min(check.nearest(row).distance for row in chests)
    seen = [s for s in seen if s.familiar]
    decided = IntendedUse(LIMBS.body_parts, 18, check)
    chest = decided.decide_from_image(check.nearest(chests[0]))
    assert (chest.analyse, chest.reason) == (False, ScopeReason.UNFAMILIAR_IMAGE)
    assert re.fullmatch(r"the image is unlike the model's training images \(distance "
                        r"\d+, limit \d+\)", chest.detail)
    hand = decided.decide_from_image(seen[0])
    assert (hand.analyse, hand.reason, hand.region) == (True, ScopeReason.REGION_FROM_IMAGE,
                                                        Region.HAND)
    legs_only = IntendedUse.for_regions([Region.LEG])
    outside = legs_only.decide_from_image(seen[0])
    assert (outside.analyse, outside.reason) == (False, ScopeReason.REGION_OUTSIDE)
    assert outside.detail == ("body region hand, decided from the image, is outside the "
                              "intended use")
    several = legs_only.decide_from_image(RegionSeen("other", None, 1.0, True))
    assert several.detail.startswith("several regions, decided from the image")


def with_check(bundle: Path, target: Path, graph: Path, check: RegionCheck,
               body_parts: list[str], crop: str | None = None) -> Path:
    """A copy of `bundle` whose intended use is `body_parts` with the region check (and
    whose classifier input is cropped as `crop` says, where given)."""
    shutil.copytree(bundle, target)
    shutil.copy(graph, target / REGION_CHECK_FILE)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    manifest["intended_use"] = {"body_parts": body_parts, "min_age_years": 18,
                                "region_check": {"classes": list(check.classes),
                                                 "threshold": check.threshold,
                                                 "backbone": check.backbone,
                                                 "validation": dict(check.validation)}}
    manifest["files"][REGION_CHECK_FILE] = hashlib.sha256(graph.read_bytes()).hexdigest()
    if crop is not None:
        manifest["preprocessing"] = {"crop": crop}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


@pytest.fixture
def limbs(untrained_bundle: Path, fitted: tuple[Path, RegionCheck], tmp_path: Path) -> Path:
    return with_check(untrained_bundle, tmp_path / "limbs", *fitted,
                      body_parts=list(LIMBS.body_parts))


def test_the_manifest_carries_it_and_a_bad_one_is_refused(
        limbs: Path, fitted: tuple[Path, RegionCheck], tmp_path: Path) -> None:
    loaded = Bundle.load(limbs).manifest.intended_use
    assert loaded is not None and loaded.region_check is not None
    assert loaded.region_check.classes == ("hand", "leg")
    assert loaded.region_check.threshold == fitted[1].threshold
    for i, (change, message) in enumerate([
            (lambda m: m["intended_use"]["region_check"].update(classes=["hand", "arm"]),
             "region_check.classes"),
            (lambda m: m["intended_use"]["region_check"].update(threshold=0),
             "region_check.threshold"),
            (lambda m: m["files"].pop(REGION_CHECK_FILE), "must include 'region_check.onnx'"),
    ]):
        target = tmp_path / f"bad{i}"
        shutil.copytree(limbs, target)
        manifest = json.loads((target / MANIFEST_FILE).read_text())
        change(manifest)
        (target / MANIFEST_FILE).write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=re.escape(message)):
            Bundle.load(target)


def dicom(image: np.ndarray, body_part: str | None, study_uid: str | None = None) -> Dataset:
    """A DX whose pixels are `image` and whose header says `body_part` (None: nothing)."""
    ds = factory.xray(study_uid or generate_uid(), rows=image.shape[0], cols=image.shape[1])
    del ds.AnatomicRegionSequence
    ds.PixelData = (image * 4095).astype(np.uint16).tobytes()
    if body_part is None:
        del ds.BodyPartExamined
    else:
        ds.BodyPartExamined = body_part
    return ds


def test_the_pipeline_asks_the_image_only_where_the_header_cannot_say(limbs: Path) -> None:
    pipeline = Pipeline(Bundle.load(limbs))
    chest, hand = drawing("chest", 900), drawing("hand", 901)
    ref = ImageRef("", "", "", "")
    findings = pipeline.run(
        [(ref, chest), (ref, hand), (ref, chest), (ref, chest)],
        [None, dicom(hand, "EXTREMITY"), dicom(chest, "HAND"), dicom(chest, "CHEST")])
    scopes = [finding.scope for finding in findings]
    assert [(s.analyse, s.reason) for s in scopes] == [
        (False, ScopeReason.UNFAMILIAR_IMAGE),
        (True, ScopeReason.REGION_FROM_IMAGE),
        (True, ScopeReason.IN_SCOPE),  # the header says HAND: its word stands
        (False, ScopeReason.BODY_PART_OUTSIDE)]  # the header decides, before any check
    assert scopes[1].region is Region.HAND


def test_predict_says_per_file_what_the_image_showed(limbs: Path, tmp_path: Path) -> None:
    files = []
    for name, image in (("chest", drawing("chest", 910)), ("leg", drawing("leg", 911))):
        cv2.imwrite(str(tmp_path / f"{name}.png"), (image * 255).astype(np.uint8))
        files.append(str(tmp_path / f"{name}.png"))
    result = CliRunner().invoke(main, ["predict", *files, "--bundle", str(limbs), "--json"])
    assert result.exit_code == 0, result.output
    chest, leg = (json.loads(line) for line in result.stdout.splitlines())
    assert chest["not_analysed"]["reason"] == "unfamiliar_image"
    assert "probability" not in chest
    assert leg["scope"] == {"reason": "region_from_image",
                            "detail": "body region leg, decided from the image"}
    assert "probability" in leg


@pytest.mark.peers
def test_the_node_decides_from_the_image_and_counts_why(limbs: Path, tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", limbs, []).start()
    try:
        study = generate_uid()
        leg = dicom(drawing("leg", 920), None, study)
        chest = dicom(drawing("chest", 921), "EXTREMITY", study)
        rows = node.store_and_settle(tmp_path, [("leg", leg), ("chest", chest)], studies=1)
        assert rows[study]["state"] == "done"
        skipped = {e["sop_instance_uid"]: e for e in node.events("image.skipped")}
        assert skipped[str(chest.SOPInstanceUID)]["scope"] == "unfamiliar_image"
        assert str(leg.SOPInstanceUID) not in skipped
        processed = wait_for("the processed study's log line",
                             lambda: node.events("study.processed"), 30)
        assert [e["images"] for e in processed] == [1]
        paths = [p for p in (node.folder / "spool").rglob("*.dcm")
                 if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SR"]
        assert len(paths) == 1 and pydicom.dcmread(paths[0]).CompletionFlag == "PARTIAL"
        errors, _ = dciodvfy(paths[0])  # the SR naming the refused image is valid
        assert errors == [], errors
        _, _, text = get(node.metrics_port, "/metrics")
        samples = parse(text)
        for reason, count in (("region_from_image", 1), ("unfamiliar_image", 1),
                              ("unknown_body_part", 0)):
            assert value(samples, "fractured_images_scope_checked_total",
                         reason=reason) == count
        assert sum(value(samples, "fractured_findings_total", region="leg", level=level)
                   for level in ("negative", "possible", "likely")) == 1
        assert node.status()["last_7_days"]["not_analysed"] == {"unfamiliar_image": 1}
    finally:
        node.stop()


@pytest.mark.slow
def test_real_films_without_a_body_part_are_decided_right(tmp_path: Path) -> None:
    """Fitted on 90 FracAtlas images per body part (the shipped build uses all ~2,700),
    cropped to the exposed field as the shipped models are, with the node's pipeline
    on the vendor files: each one's Body Part Examined, Anatomic Region and age
    removed, a chest gets no verdict, the hip and pelvis neither, the lower legs are
    analysed as legs. With 450 images the 99 % floor puts the threshold at about the
    largest held-out distance, so a chest may be placed as a shoulder rather than
    refused as unfamiliar: the shipped check's own reasons are tested on the shipped
    bundle (tests/artifacts/test_shipped_model.py)."""
    from fractured.training.build import build_untrained_bundle
    from fractured.training.data import letterbox_samples
    from fractured.training.datasets import open_dataset

    if not factory.SHARED_DICOM.is_dir() or not factory.SHARED_FRACATLAS.is_dir():
        print(f"skipping: {factory.SHARED_DICOM} or {factory.SHARED_FRACATLAS} is absent "
              "(../shared sits beside the development checkout only)")
        pytest.skip("../shared is absent")
    by_part: dict[str, list] = {}
    for sample in open_dataset(factory.SHARED_FRACATLAS).samples:
        by_part.setdefault(sample.body_part, []).append(sample)
    seen = letterbox_samples([s for part in by_part.values() for s in part[:90]], 256,
                             crop=EXPOSED_FIELD)
    model = fit(imagenet_features(), seen.images, [s.body_part for s in seen.samples],
                [i % 5 for i in range(len(seen.samples))], mean=MEAN, std=STD)
    graph = tmp_path / REGION_CHECK_FILE
    export(model.net, graph, 256)
    check = threshold(model)
    assert check.validation["accepted"] >= ACCEPTED
    bundle = with_check(build_untrained_bundle(tmp_path / "untrained", input_size=256),
                        tmp_path / "limbs", graph, check, list(LIMBS.body_parts),
                        crop=EXPOSED_FIELD)
    pipeline = Pipeline(Bundle.load(bundle))
    for path in factory.shared_films():
        scope = factory.scope_without_body_part(pipeline, path)
        if factory.film_shows(path) == "lower leg":
            assert (scope.reason, scope.region) == (ScopeReason.REGION_FROM_IMAGE,
                                                    Region.LEG), path.name
        else:
            assert scope.reason in (ScopeReason.REGION_OUTSIDE,
                                    ScopeReason.UNFAMILIAR_IMAGE), (path.name, scope.detail)


@pytest.mark.slow
def test_int8_keeps_the_float_region_check_it_was_measured_with(
        scored_bundle: tuple[Path, Path, Path], fitted: tuple[Path, RegionCheck],
        tmp_path: Path) -> None:
    _, split_dir, source = scored_bundle
    checked = with_check(source, tmp_path / "checked", *fitted,
                         body_parts=list(LIMBS.body_parts))
    out = tmp_path / "int8"
    result = CliRunner().invoke(main, ["quantize", str(checked), "--split", str(split_dir),
                                       "--out", str(out), "--version", "1.0.1", "--report",
                                       str(tmp_path / "report"), "--calibration-images", "8",
                                       "--bootstrap", "20", "--max-auc-drop", "1"])
    assert result.exit_code == 0, result.output
    manifest = Bundle.load(out).manifest
    assert manifest.intended_use == Bundle.load(checked).manifest.intended_use
    assert (out / REGION_CHECK_FILE).read_bytes() == fitted[0].read_bytes()
    chest = Pipeline(Bundle.load(out)).run([(ImageRef("", "", "", ""), drawing("chest", 930))])
    assert chest[0].scope.reason is ScopeReason.UNFAMILIAR_IMAGE


def drawn_fracatlas(root: Path, per_region: int) -> Path:
    """A FracAtlas-format data set of hand and leg drawings, and its split beside it."""
    from fractured.training.datasets import open_dataset
    from fractured.training.splits import make_split, write_split

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = []
    for region, first_seed in (("hand", 1000), ("leg", 2000)):
        for i, image in enumerate(drawings(region, per_region, first_seed)):
            name = f"IMG{first_seed + i:07d}.jpg"
            cv2.imwrite(str(root / "images" / name), (255 * image).astype(np.uint8))
            (root / "labels" / f"{Path(name).stem}.txt").write_text("")
            rows.append(f"{name},not_fractured,{region},0,0,1,0,0,0,{SIZE},{SIZE},{SIZE},{SIZE}")
    (root / "manifest.csv").write_text(
        "image,label,body_part,hardware,multiscan,frontal,lateral,oblique,n_boxes,width,"
        "height,orig_width,orig_height\n" + "\n".join(rows) + "\n")
    write_split(make_split(open_dataset(root), val=0.2, test=0.2), root.parent / "split")
    return root.parent / "split"


def classifier_state(path: Path, data: Path, split: Path, input_size: int = SIZE) -> Path:
    """A classifier checkpoint as far as the region check reads one: its input, and the
    data and split it was trained on."""
    from fractured.training import checkpoint

    checkpoint.save(path, {"kind": "classifier",
                           "model_spec": {"input_size": input_size, "mean": list(MEAN),
                                          "std": list(STD)},
                           "provenance": {"dataset": str(data), "format": "fracatlas",
                                          "split": str(split)},
                           "settings": {"data": {"positive": None}}})
    return path


def test_region_check_refits_a_bundles_check_and_keeps_its_models(
        limbs: Path, tmp_path: Path) -> None:
    """`fractured region-check`: the new bundle's check is fitted on the checkpoint's
    train and val parts with its threshold chosen out of fold; every other file is the
    source's; the card says how the threshold was chosen."""
    data = tmp_path / "atlas" / "data"
    split = drawn_fracatlas(data, 100)
    state = classifier_state(tmp_path / "best.pt", data, split)
    out = tmp_path / "refitted"
    result = CliRunner().invoke(main, ["region-check", str(limbs), "--out", str(out),
                                       "--version", "1.0.1", "--checkpoint", str(state)])
    assert result.exit_code == 0, result.output
    assert re.search(r"threshold \d+\.\d: accepts \d+\.\d% of 160 images out of fold",
                     result.output)
    new, old = Bundle.load(out).manifest, Bundle.load(limbs).manifest
    check = new.intended_use.region_check
    assert check is not None and check.validation["images"] == 160
    assert len(check.validation["accepted_by_fold"]) == 5
    # 160 images cannot show 99 % at the lower end of an exact interval: all accepted
    assert check.validation["accepted"] == 1.0
    assert check.threshold != old.intended_use.region_check.threshold
    assert new.intended_use.body_parts == old.intended_use.body_parts
    assert new.training["region_check"]["source"] == f"{old.name}-{old.version}"
    assert {key for key in new.files if new.files[key] != old.files[key]} == {
        REGION_CHECK_FILE, "MODEL_CARD.md"}
    chest = Pipeline(Bundle.load(out)).run([(ImageRef("", "", "", ""), drawing("chest", 931))])
    assert chest[0].scope.reason is ScopeReason.UNFAMILIAR_IMAGE


def with_training_record(bundle: Path, target: Path, data: Path, split: Path,
                         **recorded: object) -> Path:
    """A copy of `bundle` whose manifest records its classifier's data as a build does:
    the data set, and the split's train and val counts (`recorded` over them)."""
    from fractured.training.splits import read_written

    shutil.copytree(bundle, target)
    manifest = json.loads((target / MANIFEST_FILE).read_text())
    entries = read_written(split)[1].values()
    record: dict[str, object] = {"dataset": str(data), "format": "fracatlas"}
    for part in ("train", "val"):
        record[f"{part}_images"] = sum(entry.split == part for entry in entries)
        record[f"{part}_positive"] = sum(entry.label for entry in entries
                                         if entry.split == part)
    manifest.setdefault("training", {})["classifier"] = {"data": record | recorded}
    (target / MANIFEST_FILE).write_text(json.dumps(manifest))
    return target


@pytest.mark.slow
def test_region_check_refits_from_the_split_when_the_checkpoint_is_gone(
        limbs: Path, tmp_path: Path) -> None:
    """Run directories do not outlive their machines: with the classifier's split folder
    and the bundle's own record, the refit fits the very check the checkpoint gives."""
    from fractured.training.datasets import open_dataset
    from fractured.training.splits import make_split, read_written, write_split

    data = tmp_path / "atlas" / "data"
    split = drawn_fracatlas(data, 100)
    state = classifier_state(tmp_path / "best.pt", data, split)
    recorded = with_training_record(limbs, tmp_path / "recorded", data, split)
    runner = CliRunner()
    outs = {way: tmp_path / f"by-{way}" for way in ("checkpoint", "split")}
    for way, given in (("checkpoint", state), ("split", split)):
        result = runner.invoke(main, ["region-check", str(recorded), "--out", str(outs[way]),
                                      "--version", "1.0.1", f"--{way}", str(given)])
        assert result.exit_code == 0, result.output
    by_split, by_checkpoint = (Bundle.load(outs[way]).manifest for way in ("split", "checkpoint"))
    assert by_split.intended_use.region_check == by_checkpoint.intended_use.region_check
    assert by_split.training["region_check"]["split"] == str(split)

    # refused: a split with other counts, one whose sha256 differs from the recorded
    # one, both ways at once, and a checkpoint that is gone (naming the way out)
    other = tmp_path / "other-split"
    write_split(make_split(open_dataset(data), val=0.3, test=0.1), other)
    sha = read_written(split)[0]["csv_sha256"]
    pinned = with_training_record(limbs, tmp_path / "pinned", data, split,
                                  split_csv_sha256=sha.replace(sha[0], "x"))
    for bundle, flags, message in (
            (recorded, ["--split", str(other)], "classifier was trained and calibrated with"),
            (pinned, ["--split", str(split)], "(csv_sha256 differs)"),
            (recorded, ["--split", str(split), "--checkpoint", str(state)], "not both"),
            (recorded, [], "give the classifier's split folder instead")):
        result = runner.invoke(main, ["region-check", str(bundle), "--out",
                                      str(tmp_path / "out"), "--version", "1.0.2", *flags])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not (tmp_path / "out").exists()


def test_region_check_refuses_what_it_cannot_refit(untrained_bundle: Path, limbs: Path,
                                                   tmp_path: Path) -> None:
    data = tmp_path / "atlas" / "data"
    split = drawn_fracatlas(data, 12)
    for bundle, state, message in (
            (untrained_bundle, classifier_state(tmp_path / "a.pt", data, split),
             "declares no intended use"),
            (limbs, classifier_state(tmp_path / "b.pt", data, split, input_size=SIZE * 2),
             "its classifier saw input size, crop, mean and std"),
            (limbs, tmp_path / "garbage.pt", "not a readable checkpoint"),
            (limbs, classifier_state(tmp_path / "c.pt", data, split),
             "the region check could not be fitted")):
        if not state.exists():
            state.write_bytes(b"not a checkpoint")
        result = CliRunner().invoke(main, ["region-check", str(bundle), "--out",
                                           str(tmp_path / "out"), "--version", "1.0.1",
                                           "--checkpoint", str(state)])
        assert result.exit_code != 0 and message in result.output, result.output
        assert not (tmp_path / "out").exists()
