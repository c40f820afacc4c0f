"""TensorRT: plan targets and refusals (everywhere), plans against ONNX Runtime (GPU only).

The GPU tests need the tensorrt package and a CUDA GPU; elsewhere they are skipped and
`-ra` prints why. FP16 plans are compared with ONNX Runtime's FP32 on the same graphs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from structlog.testing import capture_logs

from fractured.cli import main
from fractured.engine.backends import choose_backend
from fractured.engine.backends import tensorrt as tensorrt_backend
from fractured.engine.backends.onnxruntime import OnnxRuntimeClassifier, OnnxRuntimeDetector
from fractured.engine.backends.tensorrt import (
    TensorRTClassifier,
    TensorRTDetector,
    unavailable_reason,
)
from fractured.engine.bundle import MANIFEST_FILE, Bundle, BundleError, Manifest
from fractured.engine.models import FractureClassifier
from fractured.engine.preprocess import to_model_input
from fractured.training.export import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BuildError,
    build_untrained_detector,
    calibrate_batchnorm,
    export_classifier,
    export_detector,
    synthetic_images,
)
from fractured.training.tensorrt import (
    PlanTarget,
    build_plan,
    output_gap,
    plan_is_usable,
    unpaired_boxes,
)

REASON = unavailable_reason()
needs_tensorrt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT cannot run here: "
                                                               f"{REASON}")
without_tensorrt = pytest.mark.skipif(REASON is None, reason="TensorRT can run here")

CLASSIFIER_SIZE = 128
DETECTOR_SIZE = 256  # as in test_detector.py: three FPN levels, quick to export
PLAN_MAX_BATCH = 4

L4 = PlanTarget(gpu_name="NVIDIA L4", compute_capability="8.9", tensorrt_version="10.3.0")


def model_input(count: int, size: int, seed: int = 0) -> np.ndarray:
    return to_model_input(synthetic_images(size, count, seed=seed), IMAGENET_MEAN, IMAGENET_STD)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.float32, what
    difference, allowed = output_gap(actual, expected)
    assert difference <= allowed, f"{what}: differs by {difference:.3g}"


# --- plan targets: pure, run everywhere --------------------------------------------------

def test_a_plan_is_usable_on_its_own_target() -> None:
    assert plan_is_usable(L4, L4) == (True, "")


def test_a_plan_from_another_tensorrt_version_is_not_usable() -> None:
    usable, reason = plan_is_usable(L4, replace(L4, tensorrt_version="10.7.0"))
    assert not usable
    assert "TensorRT 10.3.0" in reason and "TensorRT 10.7.0" in reason and "rebuild" in reason


def test_a_plan_for_another_compute_capability_is_not_usable() -> None:
    a10 = PlanTarget(gpu_name="NVIDIA A10", compute_capability="8.6", tensorrt_version="10.3.0")
    usable, reason = plan_is_usable(L4, a10)
    assert not usable
    assert "8.9 (NVIDIA L4)" in reason and "8.6 (NVIDIA A10)" in reason


def test_every_mismatch_is_reported() -> None:
    usable, reason = plan_is_usable(L4, PlanTarget("NVIDIA A10", "8.6", "10.7.0"))
    assert not usable and "10.7.0" in reason and "8.6" in reason


def test_another_gpu_model_of_the_same_capability_is_usable_with_a_note() -> None:
    rtx = replace(L4, gpu_name="NVIDIA GeForce RTX 4090")
    usable, reason = plan_is_usable(L4, rtx)
    assert usable and "NVIDIA L4" in reason and "NVIDIA GeForce RTX 4090" in reason



def test_plan_outputs_and_boxes_are_compared_within_the_fp16_tolerance() -> None:
    expected = np.array([[2.0, -4.0]], dtype=np.float32)
    assert output_gap(expected + 0.1, expected) == pytest.approx((0.1, 0.2))  # 5 % of 4
    assert output_gap(expected[:, :1], expected)[0] == float("inf")  # another shape
    boxes = np.array([[10, 10, 50, 50], [0, 0, 4, 4]], dtype=np.float32)
    labels = np.array([1, 1])
    reference = [boxes, np.array([0.9, 0.01], dtype=np.float32), labels]
    near = [boxes + 1.5, np.array([0.87, 0.01], dtype=np.float32), labels]
    assert unpaired_boxes(reference, near) == ([], 1)  # the 0.01 box is not checked
    moved = [boxes + 3.0, near[1], labels]
    missing, checked = unpaired_boxes(reference, moved)
    assert checked == 1 and missing == ["[10.0, 10.0, 50.0, 50.0] score 0.900"]
    rescored = [boxes, np.array([0.8, 0.01], dtype=np.float32), labels]
    assert len(unpaired_boxes(reference, rescored)[0]) == 1

def with_plans(bundle_dir: Path, **built_for: str) -> dict[str, Any]:
    """The manifest of the bundle at `bundle_dir` as if it held a TensorRT plan."""
    data = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    data["backends"] = ["onnxruntime", "tensorrt"]
    data["files"] = {**data["files"], "classifier.plan": "0" * 64}
    if built_for:
        data["tensorrt"] = built_for
    return data


def test_a_bundle_with_plans_records_what_they_were_built_for(untrained_bundle: Path) -> None:
    data = with_plans(untrained_bundle)
    with pytest.raises(BundleError, match="key 'tensorrt' must record the GPU and TensorRT "
                                          "version the plans were built for"):
        Manifest.from_dict(data)
    data["tensorrt"] = asdict(L4)
    manifest = Manifest.from_dict(data)
    assert dict(manifest.tensorrt or {}) == asdict(L4)
    assert manifest.to_dict()["tensorrt"] == asdict(L4)
    assert "tensorrt" not in Bundle.load(untrained_bundle).manifest.to_dict()
    del data["files"]["classifier.plan"]
    with pytest.raises(BundleError,
                       match=re.escape("must include 'classifier.plan' for the tensorrt")):
        Manifest.from_dict(data)
    data = with_plans(untrained_bundle, **asdict(L4), cuda="12.4")
    with pytest.raises(BundleError, match=r"unknown key.*'tensorrt\.cuda'"):
        Manifest.from_dict(data)


def test_plans_built_for_another_target_are_skipped_with_a_warning(
        untrained_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where TensorRT runs, "auto" takes the plans only if they were built for this
    GPU's compute capability and this TensorRT; otherwise ONNX Runtime runs, and the
    log says why. (This machine's target is set here: no GPU is needed to decide.)"""
    bundle = Bundle(untrained_bundle, Manifest.from_dict(with_plans(untrained_bundle,
                                                                    **asdict(L4))))
    monkeypatch.setattr(tensorrt_backend, "unavailable_reason", lambda: None)

    def here_is(target: PlanTarget) -> None:
        monkeypatch.setattr(tensorrt_backend.PlanTarget, "current",
                            classmethod(lambda cls: target))

    here_is(replace(L4, tensorrt_version="10.7.0"))
    with capture_logs() as logs:
        assert choose_backend(bundle, "auto") == "onnxruntime"
    skipped = [e for e in logs if e["event"] == "engine.tensorrt_plans_skipped"]
    assert len(skipped) == 1 and "TensorRT 10.3.0" in skipped[0]["reason"] \
        and "rebuild the plan on this node" in skipped[0]["reason"]
    with pytest.raises(BundleError, match=r"tensorrt backend unavailable: built with "
                                          r"TensorRT 10\.3\.0, this node has TensorRT 10\.7\.0"):
        choose_backend(bundle, "tensorrt")
    here_is(replace(L4, compute_capability="9.0", gpu_name="NVIDIA H100"))
    assert choose_backend(bundle, "auto") == "onnxruntime"

    here_is(L4)
    with capture_logs() as logs:
        assert choose_backend(bundle, "auto") == "tensorrt"
    assert not logs
    here_is(replace(L4, gpu_name="NVIDIA L40S"))  # same capability: runs, with a note
    with capture_logs() as logs:
        assert choose_backend(bundle, "tensorrt") == "tensorrt"
    assert [e["event"] for e in logs] == ["engine.tensorrt_plans_for_another_gpu"]

# --- without TensorRT: clear refusals ----------------------------------------------------

@without_tensorrt
def test_unavailable_reason_names_what_is_missing() -> None:
    assert REASON is not None
    assert "tensorrt" in REASON or "GPU" in REASON


@without_tensorrt
def test_opening_a_plan_without_tensorrt_says_why(tmp_path: Path) -> None:
    plan = tmp_path / "classifier.plan"
    plan.write_bytes(b"not opened")
    for backend in (TensorRTClassifier, TensorRTDetector):
        with pytest.raises(BundleError, match=re.escape(f"{plan}: ")) as info:
            backend(plan)
        assert str(REASON) in str(info.value)


@without_tensorrt
def test_building_a_plan_without_tensorrt_says_why(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=re.escape(str(REASON))):
        build_plan(tmp_path / "classifier.onnx", tmp_path / "classifier.plan")
    assert not list(tmp_path.iterdir())


def test_build_plan_refuses_bad_batch_and_workspace_options(tmp_path: Path) -> None:
    onnx, plan = tmp_path / "classifier.onnx", tmp_path / "classifier.plan"
    with pytest.raises(ValueError, match="opt_batch"):
        build_plan(onnx, plan, max_batch=4, opt_batch=5)
    with pytest.raises(ValueError, match="max_batch"):
        build_plan(onnx, plan, max_batch=0)
    with pytest.raises(ValueError, match="workspace_gb"):
        build_plan(onnx, plan, workspace_gb=0)


# --- on a GPU: FP16 plans against ONNX Runtime -------------------------------------------

@pytest.fixture(scope="module")
def classifier_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained, BatchNorm-calibrated B0 classifier at 128 px, as build_untrained_bundle
    exports it (dynamic batch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FractureClassifier(variant="b0", num_labels=1)
        calibrate_batchnorm(model, CLASSIFIER_SIZE)
    path = tmp_path_factory.mktemp("tensorrt") / "classifier.onnx"
    export_classifier(model, path, CLASSIFIER_SIZE)
    return path


@pytest.fixture(scope="module")
def classifier_plan(classifier_onnx: Path) -> tuple[Path, PlanTarget]:
    plan = classifier_onnx.with_suffix(".plan")
    return plan, build_plan(classifier_onnx, plan, max_batch=PLAN_MAX_BATCH)


@pytest.fixture(scope="module")
def detector_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained MobileNetV3-FPN detector at 256 px, exported for one image."""
    path = tmp_path_factory.mktemp("tensorrt") / "detector.onnx"
    export_detector(build_untrained_detector(input_size=DETECTOR_SIZE, seed=0), path,
                    DETECTOR_SIZE)
    return path


@needs_tensorrt
@pytest.mark.slow
def test_classifier_plan_matches_onnx_runtime(classifier_onnx: Path,
                                              classifier_plan: tuple[Path, PlanTarget]) -> None:
    plan, target = classifier_plan
    assert target == PlanTarget.current()
    assert plan_is_usable(target, PlanTarget.current()) == (True, "")
    backend = TensorRTClassifier(plan)
    assert backend.name == "tensorrt" and backend.max_batch == PLAN_MAX_BATCH
    batch = model_input(PLAN_MAX_BATCH + 2, CLASSIFIER_SIZE)  # more than one profile's worth
    logits, cam = backend.run(batch)
    expected_logits, expected_cam = OnnxRuntimeClassifier(classifier_onnx).run(batch)
    assert_close(logits, expected_logits, "logits")
    assert_close(cam, expected_cam, "CAM")
    single_logits, _ = backend.run(batch[:1])
    assert_close(single_logits, expected_logits[:1], "logits of a batch of one")
    empty_logits, empty_cam = backend.run(batch[:0])
    assert empty_logits.shape == (0, *logits.shape[1:])
    assert empty_cam.shape == (0, *cam.shape[1:])


@needs_tensorrt
@pytest.mark.slow
def test_detector_plan_matches_onnx_runtime(detector_onnx: Path) -> None:
    plan = detector_onnx.with_suffix(".plan")
    build_plan(detector_onnx, plan)
    backend = TensorRTDetector(plan)
    reference = OnnxRuntimeDetector(detector_onnx)
    assert backend.detections_per_image == reference.detections_per_image
    batch = model_input(2, DETECTOR_SIZE, seed=7)
    actual, expected = backend.run(batch), reference.run(batch)
    for got, want in zip(actual, expected, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
    compared = 0
    for image in range(len(batch)):
        mine = [part[image] for part in actual]
        theirs = [part[image] for part in expected]
        missing, checked = unpaired_boxes(theirs, mine)
        assert not missing, f"image {image}: ONNX Runtime boxes TensorRT lacks: {missing}"
        missing, _ = unpaired_boxes(mine, theirs)
        assert not missing, f"image {image}: TensorRT boxes ONNX Runtime lacks: {missing}"
        compared += checked
    assert compared > 0, "no detection above the cut-off: the comparison proved nothing"


@needs_tensorrt
@pytest.mark.slow
def test_plans_that_cannot_be_used_are_refused(tmp_path: Path,
                                               classifier_plan: tuple[Path, PlanTarget]) -> None:
    garbage = tmp_path / "classifier.plan"
    garbage.write_bytes(b"\0" * 1024)
    with pytest.raises(BundleError, match=re.escape(f"{garbage}: TensorRT")):
        TensorRTClassifier(garbage)
    plan, _ = classifier_plan
    with pytest.raises(BundleError, match="expected input 'image' and outputs boxes"):
        TensorRTDetector(plan)


@needs_tensorrt
def test_a_graph_tensorrt_cannot_parse_is_a_build_error(tmp_path: Path) -> None:
    onnx = tmp_path / "classifier.onnx"
    onnx.write_bytes(b"not an ONNX graph")
    with pytest.raises(BuildError, match="ONNX parser refused"):
        build_plan(onnx, tmp_path / "classifier.plan")
    assert not (tmp_path / "classifier.plan").exists()


@without_tensorrt
def test_build_engine_asked_for_plans_where_tensorrt_cannot_run_says_why(
        tmp_path: Path) -> None:
    out = tmp_path / "with-plans"
    result = CliRunner().invoke(main, ["build-engine", "--untrained", "--input-size", "64",
                                       "--tensorrt", "--out", str(out)])
    assert result.exit_code == 1
    assert f"cannot build TensorRT plans here: {REASON}" in result.output
    assert not out.exists()


@needs_tensorrt
@pytest.mark.slow
def test_build_engine_builds_checked_plans_the_node_runs(tmp_path: Path) -> None:
    out = tmp_path / "with-plans"
    result = CliRunner().invoke(main, [
        "build-engine", "--untrained", "--input-size", str(CLASSIFIER_SIZE), "--detector",
        "mobilenet_v3_large_fpn", "--detector-input-size", str(DETECTOR_SIZE), "--tensorrt",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(out)
    assert "tensorrt" in bundle.manifest.backends
    assert dict(bundle.manifest.tensorrt or {}) == asdict(PlanTarget.current())
    assert {"classifier.plan", "detector.plan"} <= set(bundle.manifest.files)
    assert choose_backend(bundle, "auto") == "tensorrt"
    batch = model_input(2, CLASSIFIER_SIZE)
    logits, cam = TensorRTClassifier(out / "classifier.plan").run(batch)
    expected_logits, expected_cam = OnnxRuntimeClassifier(out / "classifier.onnx").run(batch)
    assert_close(logits, expected_logits, "logits")
    assert_close(cam, expected_cam, "CAM")
