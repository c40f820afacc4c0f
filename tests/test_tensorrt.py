"""TensorRT: plan targets and refusals (everywhere), plans against ONNX Runtime (GPU only).

The GPU tests need the tensorrt package and a CUDA GPU; elsewhere they are skipped and
`-ra` prints why. FP16 plans are compared with ONNX Runtime's FP32 on the same graphs.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fractured.engine.backends.onnxruntime import OnnxRuntimeClassifier, OnnxRuntimeDetector
from fractured.engine.backends.tensorrt import (
    TensorRTClassifier,
    TensorRTDetector,
    unavailable_reason,
)
from fractured.engine.bundle import BundleError
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
from fractured.training.tensorrt import PlanTarget, build_plan, plan_is_usable

REASON = unavailable_reason()
needs_tensorrt = pytest.mark.skipif(REASON is not None, reason=f"TensorRT cannot run here: "
                                                               f"{REASON}")
without_tensorrt = pytest.mark.skipif(REASON is None, reason="TensorRT can run here")

CLASSIFIER_SIZE = 128
DETECTOR_SIZE = 256  # as in test_detector.py: three FPN levels, quick to export
PLAN_MAX_BATCH = 4
FP16_TOLERANCE = 5e-2  # relative to the output's scale (at least 1)
BOX_TOLERANCE = 2.0  # model-input pixels

L4 = PlanTarget(gpu_name="NVIDIA L4", compute_capability="8.9", tensorrt_version="10.3.0")


def model_input(count: int, size: int, seed: int = 0) -> np.ndarray:
    return to_model_input(synthetic_images(size, count, seed=seed), IMAGENET_MEAN, IMAGENET_STD)


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == np.float32, what
    scale = max(1.0, float(np.abs(expected).max()))
    difference = float(np.abs(actual - expected).max())
    assert difference <= FP16_TOLERANCE * scale, f"{what}: differs by {difference:.3g}"


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
        missing, checked = unpaired(theirs, mine)
        assert not missing, f"image {image}: ONNX Runtime boxes TensorRT lacks: {missing}"
        missing, _ = unpaired(mine, theirs)
        assert not missing, f"image {image}: TensorRT boxes ONNX Runtime lacks: {missing}"
        compared += checked
    assert compared > 0, "no detection above the cut-off: the comparison proved nothing"


def unpaired(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[list[str], int]:
    """Detections of `reference` with no detection in `other` of the same label, every
    coordinate within BOX_TOLERANCE and the score within FP16_TOLERANCE; and how many
    were checked. Detections near the last slot's score are not checked: there a
    near-tie decides which candidate makes the fixed-K list."""
    (boxes, scores, labels), (other_boxes, other_scores, other_labels) = reference, other
    cutoff = max(0.05, float(min(scores[-1], other_scores[-1]))) + FP16_TOLERANCE
    missing, checked = [], 0
    for index in np.flatnonzero(scores > cutoff):
        checked += 1
        near = ((other_labels == labels[index])
                & (np.abs(other_boxes - boxes[index]).max(axis=1) <= BOX_TOLERANCE)
                & (np.abs(other_scores - scores[index]) <= FP16_TOLERANCE))
        if not near.any():
            missing.append(f"{np.round(boxes[index], 1).tolist()} score {scores[index]:.3f}")
    return missing, checked


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
