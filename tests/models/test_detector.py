"""The fracture-box detector: torch module, ONNX export, ONNX Runtime backend, box geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from fractured.engine.backends.onnxruntime import OnnxRuntimeDetector
from fractured.engine.bundle import CLASSIFIER_FILE, DETECTOR_FILE, BundleError
from fractured.engine.models import FractureDetector
from fractured.engine.preprocess import letterbox, to_model_input
from fractured.training.export import (
    DETECTOR_BOX_TOLERANCE,
    DETECTOR_SCORE_TOLERANCE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    BuildError,
    build_untrained_detector,
    check_detector_parity,
    export_detector,
    synthetic_images,
)
from tests.conftest import DETECTOR_SIZE

SIZE = DETECTOR_SIZE


@pytest.fixture(scope="session")
def exported_detector(untrained_bundle_with_detector: Path) -> tuple[FractureDetector, Path]:
    """The session bundle's untrained MobileNetV3-FPN detector and its parity-checked ONNX
    graph; the torch module is built again from the same seed, which is deterministic,
    so it is the model the graph came from. Tests must not modify either."""
    return (build_untrained_detector(input_size=SIZE, seed=0),
            untrained_bundle_with_detector / DETECTOR_FILE)


def model_input(images: list[np.ndarray]) -> np.ndarray:
    return to_model_input(images, IMAGENET_MEAN, IMAGENET_STD)


# --- torch module ------------------------------------------------------------------------

def test_predictor_has_a_class_per_label_plus_background() -> None:
    torch.manual_seed(0)
    model = FractureDetector(num_labels=3, input_size=128).eval()
    predictor = model.model.roi_heads.box_predictor
    assert isinstance(predictor, FastRCNNPredictor)
    assert predictor.cls_score.out_features == 4
    assert predictor.bbox_pred.out_features == 16
    with torch.no_grad():
        _, scores, labels = model(torch.from_numpy(model_input(synthetic_images(128, 2))))
    assert set(labels[scores > 0].tolist()) <= {1, 2, 3}
    assert model.architecture == "fasterrcnn_mobilenet_v3_large_fpn"


def test_outputs_are_padded_to_a_fixed_count_best_first() -> None:
    torch.manual_seed(0)
    # at most 40 proposals, so at most 40 detections: the other 20 slots must be padding
    model = FractureDetector(input_size=128, detections_per_image=60,
                             rpn_post_nms_top_n=40).eval()
    with torch.no_grad():
        boxes, scores, labels = model(torch.from_numpy(model_input(synthetic_images(128, 2))))
    assert boxes.shape == (2, 60, 4) and boxes.dtype == torch.float32
    assert scores.shape == (2, 60) and labels.shape == (2, 60) and labels.dtype == torch.int64
    for image_boxes, image_scores, image_labels in zip(boxes, scores, labels, strict=True):
        found = int((image_scores > 0).sum())
        assert 0 < found <= 40
        assert torch.all(image_scores[:found] >= 0.05)  # the default score threshold
        assert torch.all(image_scores[:found].diff() <= 0)
        assert torch.all(image_labels[:found] == 1)
        assert torch.all(image_boxes[:found, 2:] >= image_boxes[:found, :2])
        assert torch.all(image_boxes[:found] >= 0) and torch.all(image_boxes[:found] <= 128)
        assert not image_scores[found:].any() and not image_labels[found:].any()
        assert not image_boxes[found:].any()


def test_detector_refuses_bad_options_and_unletterboxed_images() -> None:
    with pytest.raises(ValueError, match="mobilenet_v3_large_fpn, resnet50_fpn_v2, resnet18_fpn"):
        FractureDetector("yolo")
    with pytest.raises(ValueError, match="num_labels"):
        FractureDetector(num_labels=0)
    with pytest.raises(ValueError, match="input_size"):
        FractureDetector(input_size=16)
    with pytest.raises(ValueError, match="detections_per_image"):
        FractureDetector(detections_per_image=0)
    model = FractureDetector(input_size=128).eval()
    with pytest.raises(ValueError, match="letterboxed 128x128"):
        model(torch.zeros(1, 3, 128, 96))
    with pytest.raises(RuntimeError, match="inference"):
        model.train()(torch.zeros(1, 3, 128, 128))


def test_inner_torchvision_model_trains_on_model_input_boxes() -> None:
    torch.manual_seed(0)
    model = FractureDetector(input_size=128)
    image = torch.from_numpy(model_input(synthetic_images(128, 1)))[0]
    target = {"boxes": torch.tensor([[20.0, 30.0, 60.0, 50.0]]),
              "labels": torch.tensor([1])}
    model.model.train()
    losses = model.model([image], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.model.roi_heads.box_predictor.cls_score.weight.grad is not None


def test_resnet50_fpn_v2_builds_and_runs() -> None:
    torch.manual_seed(0)
    model = FractureDetector("resnet50_fpn_v2", input_size=128, detections_per_image=5).eval()
    assert model.architecture == "fasterrcnn_resnet50_fpn_v2"
    with torch.no_grad():
        boxes, scores, labels = model(torch.from_numpy(model_input(synthetic_images(128, 1))))
    assert boxes.shape == (1, 5, 4) and scores.shape == (1, 5) and labels.shape == (1, 5)
    assert torch.all((labels == 0) | (labels == 1))


# --- ONNX export and ONNX Runtime --------------------------------------------------------

@pytest.mark.slow
def test_resnet18_fpn_exports_and_matches_onnx_runtime(tmp_path: Path) -> None:
    """The detector a ResNet18 classifier starts: small anchors, same export and parity
    checks as the other backbones."""
    model = build_untrained_detector(backbone="resnet18_fpn", input_size=SIZE, seed=0)
    assert model.architecture == "fasterrcnn_resnet18_fpn"
    assert model.model.rpn.anchor_generator.sizes[0] == (16,)
    assert model.model.roi_heads.box_predictor.cls_score.in_features == 256
    assert model.model.backbone.out_channels == 128  # the narrow FPN a CPU can train
    export_detector(model, tmp_path / DETECTOR_FILE, SIZE)
    parity = check_detector_parity(model, tmp_path / DETECTOR_FILE, SIZE,
                                   images=synthetic_images(SIZE, 2, seed=3))
    assert parity.detections > 0
    assert parity.box_difference <= DETECTOR_BOX_TOLERANCE
    assert parity.score_difference <= DETECTOR_SCORE_TOLERANCE


@pytest.mark.slow
def test_onnx_runtime_matches_torch_on_structured_images(
        exported_detector: tuple[FractureDetector, Path]) -> None:
    model, path = exported_detector
    images = synthetic_images(SIZE, 2, seed=7)  # not the images the build checked
    parity = check_detector_parity(model, path, SIZE, images=images)
    assert parity.detections >= 10
    assert parity.box_difference <= DETECTOR_BOX_TOLERANCE
    assert parity.score_difference <= DETECTOR_SCORE_TOLERANCE
    # independently of the pairing: the same number of detections per image, and the
    # same scores once sorted (a near-tie may swap two boxes, never change the values)
    batch = model_input(images)
    with torch.no_grad():
        _, torch_scores, _ = model(torch.from_numpy(batch))
    _, onnx_scores, _ = OnnxRuntimeDetector(path).run(batch)
    for expected, actual in zip(torch_scores.numpy(), onnx_scores, strict=True):
        assert (expected > 0).sum() == (actual > 0).sum() > 0
        np.testing.assert_allclose(np.sort(actual), np.sort(expected),
                                   atol=DETECTOR_SCORE_TOLERANCE)


@pytest.mark.slow
def test_onnx_detector_returns_k_slots_per_image_for_any_batch(
        exported_detector: tuple[FractureDetector, Path]) -> None:
    model, path = exported_detector
    detector = OnnxRuntimeDetector(path, threads=1)
    assert detector.detections_per_image == model.detections_per_image == 10
    k = detector.detections_per_image
    batch = model_input(synthetic_images(SIZE, 3, seed=3))
    boxes, scores, labels = detector.run(batch)
    assert boxes.shape == (3, k, 4) and boxes.dtype == np.float32
    assert scores.shape == (3, k) and scores.dtype == np.float32
    assert labels.shape == (3, k) and labels.dtype == np.int64
    # the loop over images is invisible: each image alone gives the same result
    alone = detector.run(batch[1:2])
    for together, single in zip((boxes, scores, labels), alone, strict=True):
        np.testing.assert_array_equal(together[1:2], single)
    empty = detector.run(batch[:0])
    assert [part.shape for part in empty] == [(0, k, 4), (0, k), (0, k)]


@pytest.mark.slow
def test_parity_check_catches_a_graph_from_another_detector(
        exported_detector: tuple[FractureDetector, Path]) -> None:
    _, path = exported_detector
    other = build_untrained_detector(input_size=SIZE, seed=1)
    with pytest.raises(BuildError, match=r"differs from torch.*has no partner"):
        check_detector_parity(other, path, SIZE)


@pytest.mark.slow
def test_parity_check_refuses_to_compare_nothing(
        exported_detector: tuple[FractureDetector, Path]) -> None:
    model, path = exported_detector
    with pytest.raises(BuildError, match="compared nothing"):
        check_detector_parity(model, path, SIZE, score_floor=1.0)


def test_unloadable_detector_graph_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "detector.onnx"
    path.write_bytes(b"\x08\x07not an onnx graph")
    with pytest.raises(BundleError, match=r"detector\.onnx: ONNX Runtime cannot load it"):
        OnnxRuntimeDetector(path)


def test_classifier_graph_is_refused_as_a_detector(untrained_bundle: Path) -> None:
    with pytest.raises(BundleError, match=r"outputs boxes, scores, labels.*'logits', 'cam'"):
        OnnxRuntimeDetector(untrained_bundle / CLASSIFIER_FILE)


@pytest.mark.slow
def test_detector_graph_with_renamed_outputs_is_refused(
        exported_detector: tuple[FractureDetector, Path], tmp_path: Path) -> None:
    _, path = exported_detector
    graph = onnx.load(str(path))
    for node in graph.graph.node:
        node.output[:] = ["confidence" if name == "scores" else name for name in node.output]
    (scores,) = [output for output in graph.graph.output if output.name == "scores"]
    scores.name = "confidence"
    renamed = tmp_path / "renamed.onnx"
    onnx.save(graph, str(renamed))
    with pytest.raises(BundleError, match=r"renamed\.onnx: expected input 'image' and outputs "
                                          r"boxes, scores, labels.*'confidence'"):
        OnnxRuntimeDetector(renamed)


def test_detector_graph_without_a_fixed_detection_count_is_refused(tmp_path: Path) -> None:
    # the right names, but as many "detections" as a NonZero finds: a count known only
    # at run time, as the legacy exporter's Faster R-CNN graphs have
    found = helper.make_node("NonZero", ["values"], ["labels"])
    nodes = [helper.make_node("Constant", [], ["values"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [3], [1, 0, 2])),
             found,
             helper.make_node("Cast", ["labels"], ["scores"], to=TensorProto.FLOAT),
             helper.make_node("Identity", ["image"], ["boxes"])]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                         [1, 3, 8, 8])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("labels", TensorProto.INT64, None)])
    path = tmp_path / "dynamic.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(BundleError, match=r"dynamic\.onnx: output 'scores' has shape .*"
                                          "fixed number of detections"):
        OnnxRuntimeDetector(path)


# --- boxes back onto the source image ----------------------------------------------------

def lit_extent(profile: np.ndarray) -> tuple[float, float]:
    """Where a bright run of value 1 starts and ends in a 1-D profile, to a fraction of a
    pixel: resampling keeps its mass (= its length) and its centre of mass."""
    length = float(profile.sum())
    centre = float((profile * (np.arange(len(profile)) + 0.5)).sum()) / length
    return centre - length / 2, centre + length / 2


@pytest.mark.parametrize(("rows", "cols", "top", "left", "height", "width"), [
    (900, 300, 500, 40, 120, 200),    # tall, shrunk
    (300, 1000, 60, 700, 150, 90),    # wide, shrunk
    (700, 700, 123, 457, 210, 77),    # square, shrunk
    (100, 100, 13, 41, 30, 22),       # square, enlarged
    (60, 150, 17, 95, 25, 40),        # wide, enlarged
    (200, 90, 35, 20, 50, 41),        # tall, enlarged
])
def test_box_around_the_letterboxed_rectangle_maps_back_onto_it(
        rows: int, cols: int, top: int, left: int, height: int, width: int) -> None:
    source = np.zeros((rows, cols), dtype=np.float32)
    source[top:top + height, left:left + width] = 1.0
    boxed, box = letterbox(source, SIZE)
    # a box fitted to where the rectangle's pixels landed in the model input
    centre_x, centre_y = box.point_to_model(left + width / 2, top + height / 2)
    x0, x1 = lit_extent(boxed[int(centre_y)])
    y0, y1 = lit_extent(boxed[:, int(centre_x)])
    mapped = box.box_to_source(x0, y0, x1, y1)
    np.testing.assert_allclose(mapped, (left, top, left + width, top + height), atol=1.0)


def test_box_on_the_padding_is_clipped_to_the_source_image() -> None:
    _, box = letterbox(np.zeros((300, 100), dtype=np.float32), SIZE)
    assert box.pad_left > 0
    assert box.box_to_source(0.0, 0.0, SIZE, SIZE) == (0.0, 0.0, 100.0, 300.0)
    inside = box.box_to_source(box.pad_left + 10.0, 20.0, box.pad_left + 30.0, 40.0)
    x_scale, y_scale = 100 / box.content_cols, 300 / box.content_rows
    assert inside == pytest.approx((10 * x_scale, 20 * y_scale, 30 * x_scale, 40 * y_scale))
    assert all(isinstance(value, float) for value in inside)
