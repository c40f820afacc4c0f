"""The torch backend on a CUDA GPU agrees with the FP32 reference on the CPU.

On CUDA the classifier runs in FP16 with channels-last memory and the detector in FP32
(with cuDNN's defaults, TF32 convolutions on GPUs that have them), so the tolerances here
are FP16's, stated per test, where the CPU backends are held to 1e-3 (test_backends.py).
Every test needs a CUDA GPU visible to torch; elsewhere they are skipped with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fractured.engine.backends import choose_backend, open_models
from fractured.engine.backends.torch import TorchDetector
from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import letterbox, to_model_input
from fractured.training.build import build_untrained_bundle
from fractured.training.export import build_untrained_detector
from tests.models.test_backends import assert_same_boxes, radiographs

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"no CUDA GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda})")

#: FP16 keeps 11 significant bits: a logit of a few units moves by ~1e-3 per rounding,
#: and ResNet18's 20 layers compound that. Measured on an H200: see docs/gpu/NOTES.md.
LOGIT_TOLERANCE = 2e-2
PROBABILITY_TOLERANCE = 5e-3
#: Of the CAM's largest magnitude (the map is what the overlay colours, relative): the
#: random-weight EfficientNet-B0 was 1.3-1.6 % off on an H200 (ResNet18 under 1 %), about
#: 4 of the overlay's 256 colour steps.
CAM_TOLERANCE = 3e-2


@pytest.fixture(scope="module")
def resnet_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight ResNet18 classifier (BatchNorm calibrated) at 160 px."""
    return build_untrained_bundle(tmp_path_factory.mktemp("engines") / "fractured-r18-0.0.0",
                                  variant="resnet18", input_size=160)


def model_input(bundle: Bundle, count: int) -> np.ndarray:
    size = bundle.manifest.classifier.input_size
    shapes = [(300, 220), (256, 256), (180, 400), (500, 330), (333, 333), (90, 200),
              (410, 390), (260, 120)][:count]
    boxed = [letterbox(pixels, size)[0] for _, pixels in radiographs(shapes)]
    return to_model_input(boxed, bundle.manifest.mean, bundle.manifest.std)


@pytest.mark.parametrize("which", ["b0", "resnet18"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_fp16_classifier_matches_fp32_on_the_cpu(which: str, batch: int,
                                                untrained_bundle: Path,
                                                resnet_bundle: Path) -> None:
    bundle = Bundle.load(untrained_bundle if which == "b0" else resnet_bundle)
    gpu = open_models(bundle, "torch", device="cuda").classifier
    cpu = open_models(bundle, "torch", device="cpu").classifier
    assert (gpu.device.type, gpu.dtype) == ("cuda", torch.float16)
    x = model_input(bundle, batch)
    (logits, cam), (ref_logits, ref_cam) = gpu.run(x), cpu.run(x)
    assert logits.dtype == cam.dtype == np.float32
    assert logits.shape == ref_logits.shape and cam.shape == ref_cam.shape
    assert np.isfinite(logits).all() and np.isfinite(cam).all()
    np.testing.assert_allclose(logits, ref_logits, rtol=LOGIT_TOLERANCE, atol=LOGIT_TOLERANCE)
    assert np.abs(cam - ref_cam).max() <= CAM_TOLERANCE * np.abs(ref_cam).max()


@pytest.fixture(scope="module")
def detector_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight MobileNetV3-FPN detector at 256 px whose head is calibrated to
    find boxes, as torch weights only (no ONNX export: the torch backend needs none)."""
    path = tmp_path_factory.mktemp("detector") / "detector.pt"
    torch.save(build_untrained_detector(backbone="mobilenet_v3_large_fpn", input_size=256,
                                        seed=0).state_dict(), path)
    return path


def test_detector_on_cuda_finds_the_cpu_boxes(detector_weights: Path) -> None:
    engines = {device: TorchDetector(detector_weights, backbone="mobilenet_v3_large_fpn",
                                     num_labels=1, input_size=256, detections_per_image=10,
                                     device=device)
               for device in ("cuda", "cpu")}
    assert engines["cuda"].device.type == "cuda"
    boxed = [letterbox(p, 256)[0] for _, p in radiographs([(300, 220), (256, 256), (180, 400)])]
    x = to_model_input(boxed, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    (boxes, scores, labels), (ref_boxes, ref_scores, ref_labels) = (
        engines["cuda"].run(x), engines["cpu"].run(x))
    assert (scores > 0).sum() > 0, "the untrained detector's calibrated head finds boxes"
    for image in range(len(x)):
        found, ref_found = scores[image] > 0, ref_scores[image] > 0
        assert found.sum() == ref_found.sum()
        np.testing.assert_array_equal(labels[image][found], ref_labels[image][ref_found])
        np.testing.assert_allclose(scores[image][found], ref_scores[image][ref_found],
                                   atol=1e-3)
        assert np.abs(boxes[image][found] - ref_boxes[image][ref_found]).max(
            initial=0.0) <= 1.0  # model-input pixels


@pytest.mark.slow  # builds the detector bundle (~30 s) where no other test did
def test_a_study_on_cuda_gives_the_onnxruntime_findings(
        untrained_bundle_with_detector: Path) -> None:
    bundle = Bundle.load(untrained_bundle_with_detector)
    images = radiographs([(300, 220), (256, 256), (180, 400)])
    on_gpu = Pipeline(bundle, "torch", boxes="always", device="cuda")
    assert on_gpu.models.classifier.device.type == "cuda"  # type: ignore[attr-defined]
    found = on_gpu.run(images)
    reference = Pipeline(bundle, "onnxruntime", boxes="always").run(images)
    for a, b in zip(found, reference, strict=True):
        assert a.probability == pytest.approx(b.probability, abs=PROBABILITY_TOLERANCE)
        assert a.heatmap.shape == b.heatmap.shape
        assert np.abs(a.heatmap - b.heatmap).max() <= CAM_TOLERANCE * max(
            np.abs(b.heatmap).max(), 1e-6)
        assert_same_boxes(a, b)


def test_auto_runs_a_bundle_with_torch_weights_on_the_gpu(untrained_bundle: Path) -> None:
    import onnxruntime as ort

    bundle = Bundle.load(untrained_bundle)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert choose_backend(bundle) == "onnxruntime"  # ONNX Runtime on the GPU first
        return
    assert choose_backend(bundle) == "torch"
    assert choose_backend(bundle, device="cpu") == "onnxruntime"  # torch kept off the GPU
    assert Pipeline(bundle).models.classifier.device.type == "cuda"  # type: ignore[attr-defined]


def test_batches_of_every_size_reuse_the_loaded_model(untrained_bundle: Path) -> None:
    """The node sends studies of 1 to max_batch images in any order: no shape is baked in,
    and GPU memory does not grow from one study to the next once each size was seen."""
    bundle = Bundle.load(untrained_bundle)
    gpu = open_models(bundle, "torch", device="cuda").classifier
    for batch in (1, 4, 8, 2):
        gpu.run(model_input(bundle, batch))
    torch.cuda.synchronize()
    settled = torch.cuda.memory_allocated()
    for batch in (8, 1, 4, 2, 8):
        logits, _ = gpu.run(model_input(bundle, batch))
        assert logits.shape[0] == batch
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == settled
