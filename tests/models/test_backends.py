"""Backends agree, the pipeline combines classifier and detector, and TTA reports spread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fractured.engine.backends import choose_backend
from fractured.engine.bundle import MANIFEST_FILE, Bundle, BundleError
from fractured.engine.findings import DecisionLevel, Finding, ImageRef
from fractured.engine.pipeline import Pipeline
from fractured.training.export import synthetic_images

REF = ImageRef("1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.1")


def radiographs(shapes: list[tuple[int, int]]) -> list[tuple[ImageRef, np.ndarray]]:
    """Structured images (bright rectangles on noise) cut to several aspect ratios."""
    out = []
    for i, (rows, cols) in enumerate(shapes):
        (square,) = synthetic_images(max(rows, cols), count=1, seed=i)
        out.append((REF, np.ascontiguousarray(square[:rows, :cols], dtype=np.float32)))
    return out


def assert_same_boxes(a: Finding, b: Finding) -> None:
    """The same number of boxes, paired by score, within 1 source pixel, at one level."""
    assert len(a.boxes) == len(b.boxes)
    for box_a, box_b in zip(sorted(a.boxes, key=lambda x: x.score),
                            sorted(b.boxes, key=lambda x: x.score), strict=True):
        coords_a = np.array([box_a.x0, box_a.y0, box_a.x1, box_a.y1])
        coords_b = np.array([box_b.x0, box_b.y0, box_b.x1, box_b.y1])
        assert np.abs(coords_a - coords_b).max() <= 1.0  # source pixels
        assert box_a.level == box_b.level


def test_auto_picks_onnxruntime_without_tensorrt_or_gpu(untrained_bundle: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: auto prefers torch on it (tests/gpu/test_cuda.py)")
    assert choose_backend(Bundle.load(untrained_bundle)) == "onnxruntime"


def test_a_backend_the_bundle_lacks_is_refused(untrained_bundle: Path) -> None:
    with pytest.raises(BundleError, match="not tensorrt"):
        choose_backend(Bundle.load(untrained_bundle), "tensorrt")


@pytest.mark.slow  # builds the detector bundle (~30 s)
def test_torch_and_onnxruntime_give_the_same_findings(
        untrained_bundle_with_detector: Path) -> None:
    bundle = Bundle.load(untrained_bundle_with_detector)
    images = radiographs([(300, 220), (256, 256), (180, 400)])
    ort = Pipeline(bundle, "onnxruntime", boxes="always").run(images)
    # the FP32 reference; the FP16 GPU path has its own tolerance (tests/gpu/test_cuda.py)
    ref = Pipeline(bundle, "torch", boxes="always", device="cpu").run(images)
    for a, b in zip(ort, ref, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=1e-3)
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-3)
        assert_same_boxes(a, b)


@pytest.mark.slow  # builds the detector bundle (~30 s)
def test_detector_boxes_are_in_source_pixels_at_the_operating_points(
        untrained_bundle_with_detector: Path) -> None:
    bundle = Bundle.load(untrained_bundle_with_detector)
    points = bundle.manifest.detector.operating_points
    findings = Pipeline(bundle, boxes="always").run(radiographs([(300, 220), (180, 400)]))
    assert any(f.boxes for f in findings), "the calibrated untrained detector finds boxes"
    for finding, (rows, cols) in zip(findings, [(300, 220), (180, 400)], strict=True):
        for box in finding.boxes:
            assert 0 <= box.x0 < box.x1 <= cols and 0 <= box.y0 < box.y1 <= rows
            assert box.score >= points.high_sensitivity
            assert box.level == points.level(box.score) != DecisionLevel.NEGATIVE
            assert box.label == "fracture"


@pytest.mark.slow  # builds the detector bundle (~30 s)
def test_boxes_show_only_on_images_the_classifier_calls_at_the_gate(
        untrained_bundle_with_detector: Path, tmp_path: Path) -> None:
    """[engine].boxes: the same detections, reported or not by the image's decision,
    moved here by moving the classifier's operating points around its probabilities."""
    bundle_dir = Path(shutil.copytree(untrained_bundle_with_detector, tmp_path / "b"))
    images = radiographs([(300, 220), (180, 400)])
    every = Pipeline(Bundle.load(bundle_dir), boxes="always").run(images)
    assert all(f.boxes for f in every), "the untrained detector finds boxes on both"

    def run_at(points: tuple[float, float], boxes: str) -> list[tuple]:
        manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
        manifest["classifier"]["operating_points"] = {
            "high_sensitivity": points[0], "high_specificity": points[1]}
        (bundle_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
        return [f.boxes for f in Pipeline(Bundle.load(bundle_dir), boxes=boxes).run(images)]

    shown = [f.boxes for f in every]
    assert run_at((1e-6, 0.999999), "possible") == shown  # every image a possible fracture
    assert run_at((1e-6, 0.999999), "likely") == [(), ()]  # none likely
    assert run_at((1e-6, 1e-5), "likely") == shown  # every image likely
    assert run_at((0.999998, 0.999999), "possible") == [(), ()]  # every image negative
    assert run_at((0.999998, 0.999999), "always") == shown


def test_tta_reports_a_spread_and_keeps_the_plain_heatmap(untrained_bundle: Path) -> None:
    bundle = Bundle.load(untrained_bundle)
    images = radiographs([(300, 220)])
    (plain,) = Pipeline(bundle).run(images)
    (tta,) = Pipeline(bundle, tta=True).run(images)
    assert plain.spread is None
    assert tta.spread is not None and tta.spread > 0.0
    np.testing.assert_array_equal(tta.heatmap, plain.heatmap)
    assert tta.probability != plain.probability  # the mean over three passes
