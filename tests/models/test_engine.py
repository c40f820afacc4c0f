"""The engine: letterbox geometry, the CAM model, bundles, backends and the pipeline."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from fractured.engine.backends import open_models
from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    CLASSIFIER_WEIGHTS,
    MANIFEST_FILE,
    MODEL_CARD_FILE,
    Bundle,
    BundleError,
    write_bundle,
)
from fractured.engine.findings import ImageRef, OperatingPoints
from fractured.engine.models import INPUT_SIZES, FractureClassifier
from fractured.engine.pipeline import Pipeline, _heatmap
from fractured.engine.preprocess import display_pixels, letterbox, to_model_input
from fractured.training.export import BuildError, calibrate_batchnorm, check_parity
from tests.factory import SHARED_DICOM

DICOM_DIR = SHARED_DICOM
DICOM_FILES = sorted(DICOM_DIR.rglob("*.dcm")) if DICOM_DIR.is_dir() else []
NO_DICOM = pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"{DICOM_DIR} is absent")
EACH_DICOM_FILE = pytest.mark.parametrize(
    "path", DICOM_FILES or [pytest.param(None, marks=NO_DICOM)],
    ids=lambda path: path.name if path else "no-files")


def ref(n: int) -> ImageRef:
    return ImageRef("1.2.3", "1.2.3.4", f"1.2.3.4.{n}", "1.2.840.10008.5.1.4.1.1.1")


def square_image(rows: int, cols: int, top: int, left: int, side: int) -> np.ndarray:
    image = np.zeros((rows, cols), dtype=np.float32)
    image[top:top + side, left:left + side] = 1.0
    return image


def radiograph_like(rows: int, cols: int, seed: int) -> np.ndarray:
    """Smooth background, a bright 'bone' bar and mild noise: an image a CNN sees as one."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols] / max(rows, cols)
    image = 0.2 + 0.1 * np.sin(6 * x + seed) * np.cos(4 * y)
    image[rows // 5: 4 * rows // 5, cols // 3: cols // 3 + max(cols // 8, 2)] = 0.8
    return np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1).astype(np.float32)


# --- letterbox -------------------------------------------------------------------------

@pytest.mark.parametrize(("rows", "cols"), [(300, 500), (90, 60), (128, 40)])
def test_letterbox_keeps_aspect_and_centres(rows: int, cols: int) -> None:
    boxed, box = letterbox(np.ones((rows, cols), dtype=np.float32), 128)
    assert boxed.shape == (128, 128)
    assert boxed.dtype == np.float32
    assert max(box.content_rows, box.content_cols) == 128
    assert abs(box.content_rows / box.content_cols - rows / cols) < 2 / min(
        box.content_rows, box.content_cols)
    lit_rows, lit_cols = np.nonzero(boxed > 0.5)
    assert (lit_rows.min(), lit_rows.max() + 1) == (box.pad_top, box.pad_top + box.content_rows)
    assert (lit_cols.min(), lit_cols.max() + 1) == (box.pad_left,
                                                    box.pad_left + box.content_cols)
    # centred: the two margins differ by at most one pixel
    assert abs((128 - box.content_rows - box.pad_top) - box.pad_top) <= 1
    assert abs((128 - box.content_cols - box.pad_left) - box.pad_left) <= 1


@pytest.mark.parametrize(("rows", "cols", "top", "left", "side"),
                         [(300, 500, 100, 320, 60),   # shrunk into the model input
                          (70, 110, 20, 60, 24)])     # enlarged into it
def test_heatmap_built_on_model_input_maps_back_onto_the_same_source_pixels(
        rows: int, cols: int, top: int, left: int, side: int) -> None:
    source = square_image(rows, cols, top, left, side)
    boxed, box = letterbox(source, 128)
    # the letterboxed image itself, as a full-resolution "heatmap"
    back = box.heatmap_to_source(boxed)
    assert back.shape == source.shape
    lit_rows, lit_cols = np.nonzero(back > 0.5)
    assert abs(lit_rows.min() - top) <= 2 and abs(lit_rows.max() + 1 - (top + side)) <= 2
    assert abs(lit_cols.min() - left) <= 2 and abs(lit_cols.max() + 1 - (left + side)) <= 2
    # a coarse map (like a 4x4-cell CAM) must peak at the same place: centroids agree
    coarse = box.heatmap_to_source(
        boxed.reshape(16, 8, 16, 8).mean(axis=(1, 3)))  # 16x16 average-pooled
    weights = coarse / coarse.sum()
    grid_rows, grid_cols = np.mgrid[0:rows, 0:cols] + 0.5
    centre = top + side / 2, left + side / 2
    assert abs(float((weights * grid_rows).sum()) - centre[0]) <= 1.5
    assert abs(float((weights * grid_cols).sum()) - centre[1]) <= 1.5


def test_point_mapping_follows_the_pixels_and_inverts_exactly() -> None:
    rows, cols, top, left, side = 300, 500, 100, 320, 60
    boxed, box = letterbox(square_image(rows, cols, top, left, side), 128)
    # the square's corners, mapped forward, bound the bright pixels in the model input
    x0, y0 = box.point_to_model(left, top)
    x1, y1 = box.point_to_model(left + side, top + side)
    lit_rows, lit_cols = np.nonzero(boxed > 0.5)
    assert abs(lit_cols.min() - x0) <= 1 and abs(lit_cols.max() + 1 - x1) <= 1
    assert abs(lit_rows.min() - y0) <= 1 and abs(lit_rows.max() + 1 - y1) <= 1
    # the image corners land on the content edges
    assert box.point_to_model(0, 0) == (box.pad_left, box.pad_top)
    assert box.point_to_model(cols, rows) == pytest.approx(
        (box.pad_left + box.content_cols, box.pad_top + box.content_rows))
    rng = np.random.default_rng(1)
    for x, y in rng.uniform(0, [cols, rows], size=(50, 2)):
        assert box.point_to_source(*box.point_to_model(x, y)) == pytest.approx((x, y), abs=1e-9)


def test_letterbox_refuses_a_non_2d_image() -> None:
    with pytest.raises(ValueError, match="2-D"):
        letterbox(np.zeros((10, 10, 3), dtype=np.float32), 64)


def test_to_model_input_replicates_grey_and_normalises() -> None:
    images = [np.full((8, 8), 0.5, dtype=np.float32), np.zeros((8, 8), dtype=np.float32)]
    batch = to_model_input(images, mean=(0.5, 0.25, 0.0), std=(1.0, 0.5, 2.0))
    assert batch.shape == (2, 3, 8, 8)
    assert batch.dtype == np.float32
    assert batch[0, :, 0, 0].tolist() == [0.0, 0.5, 0.25]
    assert batch[1, :, 0, 0].tolist() == [-0.5, -0.5, 0.0]


# --- model -----------------------------------------------------------------------------

def test_logits_are_exactly_the_mean_of_the_cam() -> None:
    torch.manual_seed(0)
    model = FractureClassifier("b0", num_labels=2)
    calibrate_batchnorm(model, 64, batches=1, batch_size=4)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, cam = model(x)
        gated = model.gated_features(x)
    assert logits.shape == (3, 2)
    assert cam.shape == (3, 2, 2, 2)  # 64 / 32
    assert torch.equal(logits, cam.mean(dim=(2, 3)))
    # ... which is the ordinary pool-then-linear classifier
    pooled = torch.nn.functional.linear(gated.mean(dim=(2, 3)),
                                        model.head.weight.flatten(1), model.head.bias)
    torch.testing.assert_close(logits, pooled, rtol=1e-5, atol=1e-5)
    assert float(logits.abs().max()) > 1e-3  # BatchNorm calibrated: not the ~1e-19 outputs


def test_model_rejects_an_unknown_variant() -> None:
    assert list(INPUT_SIZES) == ["b0", "b1", "b2", "b3", "b4", "lite0", "lite1", "lite2",
                                 "resnet18", "resnet34", "resnet50"]
    with pytest.raises(ValueError, match="b0, b1, b2, b3, b4, lite0, lite1, lite2, resnet18, "
                                         "resnet34, resnet50"):
        FractureClassifier("b9")


# --- bundle ----------------------------------------------------------------------------

@pytest.fixture
def bundle_copy(untrained_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the session bundle, free to tamper with."""
    return Path(shutil.copytree(untrained_bundle, tmp_path / "bundle"))


ManifestEdit = Callable[[dict[str, Any]], object]


def edit_manifest(bundle: Path, change: ManifestEdit) -> None:
    path = bundle / MANIFEST_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_untrained_bundle_loads(untrained_bundle: Path) -> None:
    bundle = Bundle.load(untrained_bundle)
    manifest = bundle.manifest
    assert manifest.trained is False
    assert manifest.classifier.labels == ("fracture",)
    assert manifest.classifier.input_size == 128
    assert manifest.classifier.architecture == "efficientnet_b0+attention"
    assert manifest.detector is None
    assert manifest.training["note"] == "random weights, never trained"
    assert set(manifest.files) == {CLASSIFIER_FILE, CLASSIFIER_WEIGHTS, MODEL_CARD_FILE}
    assert "UNTRAINED MODEL" in (untrained_bundle / MODEL_CARD_FILE).read_text()
    assert manifest.backends == ("onnxruntime", "torch")
    assert bundle.file(CLASSIFIER_FILE).is_file()
    assert "UNTRAINED MODEL" in bundle.model_info.label
    assert manifest.to_dict() == json.loads((untrained_bundle / MANIFEST_FILE).read_text())


def test_changed_model_file_is_refused_naming_it(bundle_copy: Path) -> None:
    onnx_path = bundle_copy / CLASSIFIER_FILE
    data = bytearray(onnx_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx_path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"classifier\.onnx.*sha256"):
        Bundle.load(bundle_copy)


def test_changed_checksum_is_refused_naming_the_file(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m["files"].update({CLASSIFIER_FILE: "0" * 64}))
    with pytest.raises(BundleError, match=r"classifier\.onnx.*does not match"):
        Bundle.load(bundle_copy)


def test_missing_model_file_is_refused_naming_it(bundle_copy: Path) -> None:
    (bundle_copy / CLASSIFIER_FILE).unlink()
    with pytest.raises(BundleError, match=r"classifier\.onnx.*missing"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize(("change", "key"), [
    (lambda m: m.update(colour="blue"), "colour"),
    (lambda m: m["classifier"].update(colour="blue"), "classifier.colour"),
    (lambda m: m["classifier"].pop("operating_points"), "classifier.operating_points"),
    (lambda m: m["classifier"].update(input_size="224"), "classifier.input_size"),
    (lambda m: m.update(trained="no"), "trained"),
    (lambda m: m.update(mean=[0.5, 0.5]), "mean"),
    (lambda m: m["classifier"]["operating_points"].update(high_sensitivity=0.9),
     "classifier.operating_points"),
    (lambda m: m["classifier"]["operating_points"].update(high_specificity=1.5),
     "classifier.operating_points"),
    (lambda m: m["classifier"].update(temperature=0), "classifier.temperature"),
    (lambda m: m.update(schema_version=1), "schema_version"),
    (lambda m: m.update(backends=["onnxruntime", "tensorflow"]), "backends"),
    (lambda m: m["files"].pop(CLASSIFIER_WEIGHTS), "files"),  # needed by "torch"
    (lambda m: m.update(detector={"architecture": "x"}), "detector.backbone"),
    (lambda m: m["files"].update({"../escape.onnx": "0" * 64}), "files"),
    (lambda m: m.update(preprocessing={"crop": "collimator"}), "preprocessing.crop"),
    (lambda m: m.update(preprocessing={"crop": "exposed_field", "zoom": 2}),
     "preprocessing.zoom"),
    (lambda m: m.update(preprocessing={}), "preprocessing.crop"),
    (lambda m: m.update(preprocessing="exposed_field"), "preprocessing"),
])
def test_bad_manifest_is_refused_naming_the_key_and_file(bundle_copy: Path,
                                                         change: ManifestEdit,
                                                         key: str) -> None:
    edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match=rf"manifest\.json.*'{key}'") as caught:
        Bundle.load(bundle_copy)
    assert str(bundle_copy) in str(caught.value)


def test_existing_bundle_is_never_overwritten(untrained_bundle: Path, tmp_path: Path) -> None:
    # no torch weights in these bundles
    manifest = replace(Bundle.load(untrained_bundle).manifest, backends=("onnxruntime",))
    spare = tmp_path / "other.onnx"
    spare.write_bytes(b"not the same model")
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(untrained_bundle, manifest, {CLASSIFIER_FILE: spare})
    Bundle.load(untrained_bundle)  # untouched
    assert not [p for p in untrained_bundle.parent.iterdir() if p.name.startswith(".")]
    # an empty directory (made by an installer, say) is fine to fill
    (tmp_path / "empty").mkdir()
    written = write_bundle(tmp_path / "empty", manifest, {CLASSIFIER_FILE: spare})
    assert written.file(CLASSIFIER_FILE).read_bytes() == b"not the same model"


def test_unknown_backend_names_the_choices(untrained_bundle: Path) -> None:
    with pytest.raises(ValueError, match="auto, onnxruntime, torch, tensorrt"):
        open_models(Bundle.load(untrained_bundle), "tensorflow")


def test_parity_check_catches_a_graph_that_differs_from_the_model(
        untrained_bundle: Path) -> None:
    torch.manual_seed(1)  # different weights from the exported ones (seed 0)
    other = FractureClassifier("b0", num_labels=1)
    calibrate_batchnorm(other, 128, batches=1, batch_size=4)
    with pytest.raises(BuildError, match="differs from torch"):
        check_parity(other, untrained_bundle / CLASSIFIER_FILE, 128)


# --- pipeline --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(untrained_bundle: Path) -> Pipeline:
    return Pipeline(Bundle.load(untrained_bundle), max_batch=2)


def test_pipeline_gives_one_finding_per_image_in_order(pipeline: Pipeline) -> None:
    shapes = [(300, 200), (128, 128), (90, 400)]
    images = [(ref(i), radiograph_like(r, c, seed=i)) for i, (r, c) in enumerate(shapes)]
    findings = pipeline.run(images)
    assert pipeline.backend_name == "onnxruntime"
    assert pipeline.model.trained is False
    assert [f.image for f in findings] == [r for r, _ in images]
    probabilities = [f.probability for f in findings]
    assert all(0.0 < p < 1.0 for p in probabilities)
    assert len(set(probabilities)) == 3
    for finding, (rows, cols) in zip(findings, shapes, strict=True):
        assert finding.heatmap.shape == (rows, cols)
        assert finding.heatmap.dtype == np.float32
        assert finding.heatmap.min() >= 0.0
        assert finding.heatmap.max() in (0.0, 1.0)
        assert finding.operating_points == OperatingPoints(0.4, 0.6)
        assert finding.model == pipeline.model
        assert finding.fracture == (finding.probability >= 0.4)
        assert finding.boxes == () and finding.spread is None
    # batching (2 + 1 here) does not change any result: each image alone gives the same
    for finding, image in zip(findings, images, strict=True):
        (alone,) = pipeline.run([image])
        assert alone.probability == pytest.approx(finding.probability, abs=1e-5)
        np.testing.assert_allclose(alone.heatmap, finding.heatmap, atol=1e-4)


def test_pipeline_applies_the_manifest_temperature_and_points(pipeline: Pipeline,
                                                                 bundle_copy: Path) -> None:
    image = (ref(0), radiograph_like(200, 150, seed=3))
    (plain,) = pipeline.run([image])
    def change(m: dict[str, Any]) -> None:
        m["classifier"].update(temperature=2.0, operating_points={
            "high_sensitivity": 0.25, "high_specificity": 0.75})

    edit_manifest(bundle_copy, change)
    (scaled,) = Pipeline(Bundle.load(bundle_copy)).run([image])
    logit = math.log(plain.probability / (1 - plain.probability))
    assert scaled.probability == pytest.approx(1 / (1 + math.exp(-logit / 2)), abs=1e-6)
    assert scaled.operating_points == OperatingPoints(0.25, 0.75)
    np.testing.assert_array_equal(scaled.heatmap, plain.heatmap)


def test_heatmap_without_positive_evidence_is_all_zero() -> None:
    _, box = letterbox(np.zeros((40, 60), dtype=np.float32), 64)
    heat = _heatmap(-np.ones((2, 2), dtype=np.float32), box)
    assert heat.shape == (40, 60)
    assert heat.dtype == np.float32
    assert not heat.any()


def test_pipeline_with_no_images_gives_no_findings(pipeline: Pipeline) -> None:
    assert pipeline.run([]) == []


# --- real vendor files -----------------------------------------------------------------

@EACH_DICOM_FILE
def test_pipeline_on_real_dicom_file(pipeline: Pipeline, path: Path) -> None:
    ds = pydicom.dcmread(path)
    pixels = display_pixels(ds, path.name)
    (finding,) = pipeline.run([(ref(0), pixels)])
    assert finding.heatmap.shape == (ds.Rows, ds.Columns)
    assert 0.0 < finding.probability < 1.0


def _raw_correlation(path: Path) -> float:
    ds = pydicom.dcmread(path)
    shown = display_pixels(ds, path.name)[::4, ::4].ravel()
    raw = ds.pixel_array[::4, ::4].astype(np.float64).ravel()
    return float(np.corrcoef(shown, raw)[0, 1])


@NO_DICOM
def test_monochrome1_is_inverted_so_bone_is_bright() -> None:
    path = DICOM_DIR / "derived_transcoded" / "RG3_RLE_derived.dcm"
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == (
        "MONOCHROME1")
    # MONOCHROME1 stores dense bone as low values: shown brightness must run against them
    assert _raw_correlation(path) < -0.9


@EACH_DICOM_FILE
def test_display_polarity_follows_photometric_interpretation(path: Path) -> None:
    photometric = pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation
    correlation = _raw_correlation(path)
    assert correlation < -0.9 if photometric == "MONOCHROME1" else correlation > 0.9
