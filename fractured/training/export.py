"""Models to ONNX graphs, and the proof that each graph matches its model.

Every exported graph is checked before it is used: it must give the same outputs as
the PyTorch model it came from (logits and CAM for the classifier, boxes and scores
for the detector) on image-like input, so no backend difference can reach a patient's
result unnoticed. Untrained models get BatchNorm statistics first, or the comparison
means nothing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.ops import boxes as box_ops

from fractured.engine.backends.onnxruntime import (
    DETECTOR_OUTPUT_NAMES,
    INPUT_NAME,
    OUTPUT_NAMES,
    OnnxRuntimeClassifier,
    OnnxRuntimeDetector,
)
from fractured.engine.models import Classifier, FractureDetector
from fractured.engine.preprocess import to_model_input

# ImageNet statistics: the convention torchvision backbones are built around, kept so
# that pretrained weights could be dropped in without changing the preprocessing.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-3


class BuildError(Exception):
    """An export that cannot be trusted (the message gives the measured difference)."""


def calibrate_batchnorm(model: nn.Module, input_size: int, batches: int = 4,
                        batch_size: int = 8) -> None:
    """Give untrained BatchNorm layers running statistics from synthetic images.

    Fresh BatchNorm layers (mean 0, variance 1) leave a random EfficientNet in eval
    mode outputting ~1e-19, which makes every probability 0.5 and every backend
    comparison meaningless. A cumulative average (momentum None) over a few train-mode
    batches sets usable statistics; the model is left in eval mode. The batches are
    image-like (`synthetic_images`): statistics from Gaussian noise left EfficientNet-B4
    so badly scaled on real-looking input that torch and ONNX Runtime disagreed by 5 on
    a logit, while agreeing to 1e-6 on noise.
    """
    with _batchnorm_calibration(model):
        model.train()
        with torch.no_grad():
            for index in range(batches):
                images = synthetic_images(input_size, batch_size, seed=2000 + index)
                model(torch.from_numpy(to_model_input(images, IMAGENET_MEAN, IMAGENET_STD)))


@contextlib.contextmanager
def _batchnorm_calibration(model: nn.Module) -> Iterator[list[nn.BatchNorm2d]]:
    """Reset the BatchNorm layers to a cumulative average for the forwards run inside;
    afterwards their momentum is restored and the model is left in eval mode."""
    norms = [module for module in model.modules() if isinstance(module, nn.BatchNorm2d)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    try:
        yield norms
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        model.eval()


def export_classifier(model: Classifier, path: Path, input_size: int) -> None:
    """Export to ONNX with a dynamic batch axis: input `image`, outputs `logits`, `cam`.

    The TorchScript (legacy) exporter is used: for this model it takes ~0.5 s and
    writes one self-contained file, while the dynamo exporter took ~8 s and splits the
    weights into a side file unless told not to; both graphs ran equally fast in ONNX
    Runtime and matched torch to ~1e-6. If the legacy exporter is removed, switch to
    `dynamo=True, external_data=False, verbose=False` with a `dynamic_shapes` batch Dim.
    """
    model.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        # It warns that it is deprecated (twice, from different places); that is known
        # and decided above, and would otherwise repeat in every build's output.
        warnings.filterwarnings("ignore", category=DeprecationWarning,
                                message=".*legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
        )


def check_parity(model: Classifier, onnx_path: Path, input_size: int,
                 tolerance: float = PARITY_TOLERANCE) -> tuple[float, float]:
    """Compare ONNX Runtime with torch on two image-like inputs; BuildError if they differ.

    A batch of 2 (the export example had 1) also proves the batch axis is dynamic.
    Image-like input, not noise: a badly scaled model can agree on noise and not on
    images. Returns the largest absolute difference on logits, and on the CAM in units
    of its largest magnitude where that exceeds 1: the node shows the CAM scaled to its
    peak (pipeline._heatmap), so its error matters relative to its size, and a trained
    CAM peaks at several units (a Lite0 one at 8.6, where float16-stored weights moved
    it by 0.011: 0.13 % of the peak, under 5e-5 on the heatmap shown).
    """
    batch = torch.from_numpy(to_model_input(synthetic_images(input_size, 2, seed=7),
                                            IMAGENET_MEAN, IMAGENET_STD))
    model.eval()
    with torch.no_grad():
        logits, cam = (tensor.numpy() for tensor in model(batch))
    onnx_logits, onnx_cam = OnnxRuntimeClassifier(onnx_path).run(batch.numpy())
    logits_diff = float(np.max(np.abs(onnx_logits - logits)))
    cam_diff = float(np.max(np.abs(onnx_cam - cam)) / max(float(np.max(np.abs(cam))), 1.0))
    if not (logits_diff <= tolerance and cam_diff <= tolerance):
        raise BuildError(f"{onnx_path}: ONNX Runtime differs from torch by {logits_diff:.3g} "
                         f"on logits and {cam_diff:.3g} on the CAM, relative to its peak "
                         f"(tolerance {tolerance:g})")
    return logits_diff, cam_diff


# --- float16 storage ---------------------------------------------------------------------

#: Initializers smaller than this stay float32 (biases, norms: no size to win).
FLOAT16_MIN_ELEMENTS = 1024
#: Parity tolerance (logits, CAM, box scores) for graphs with float16-stored weights.
#: The exporter folds BatchNorm into the convolutions, so those weights are rounded
#: to float16 after folding, which no rounding of the torch model reproduces: measured
#: on the shipped ResNet18 classifier, 7.5e-4 on logits and 2.8e-3 on the CAM (absolute), i.e.
#: under 2e-4 in probability.
FLOAT16_PARITY_TOLERANCE = 1e-2


def round_to_float16(model: nn.Module) -> None:
    """Round every float32 parameter and buffer of `model` to the nearest float16 value,
    in place, so the model is the one `store_weights_as_float16` will ship and parity
    checks compare like with like."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype == torch.float32:
                tensor.copy_(tensor.half().float())


def store_weights_as_float16(path: Path) -> tuple[int, int]:
    """Rewrite the ONNX file at `path` with its large float32 weights stored as float16,
    each followed by a Cast back to float32: the file is about half the size and the
    arithmetic stays float32 (ONNX Runtime folds the casts when it loads the graph, so
    inference runs at the same speed). Weights already rounded by `round_to_float16`
    are stored exactly; ones the exporter computed (BatchNorm folded into convolutions)
    are rounded here, hence FLOAT16_PARITY_TOLERANCE. Weights beyond float16's range
    are refused; ones below its smallest subnormal (6e-8) become 0. Returns the file
    size before and after.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    before = path.stat().st_size
    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    kept, casts = [], []
    for initializer in graph.initializer:
        if (initializer.data_type != TensorProto.FLOAT
                or int(np.prod(initializer.dims)) < FLOAT16_MIN_ELEMENTS):
            kept.append(initializer)
            continue
        values = numpy_helper.to_array(initializer)
        if np.abs(values).max() > np.finfo(np.float16).max:
            raise BuildError(f"{path}: weight {initializer.name} exceeds float16's range")
        stored = f"{initializer.name}__float16"
        kept.append(numpy_helper.from_array(values.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [initializer.name],
                                      to=TensorProto.FLOAT, name=f"{stored}__cast"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*casts, *nodes])
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))
    return before, path.stat().st_size


def float32_graph(source: Path, target: Path) -> None:
    """Write the graph at `source` to `target` with float16-stored weights (see
    `store_weights_as_float16`) back as float32 initializers and their Casts gone: the
    graph it was before storage, which tools that look for a convolution's weight among
    the initializers (ONNX Runtime's quantizer) need. Other graphs are copied as they are.
    """
    import onnx
    from onnx import numpy_helper

    graph_model = onnx.load(str(source))
    graph = graph_model.graph
    suffix = "__float16"
    restored = [numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32),
                                        init.name.removesuffix(suffix))
                if init.name.endswith(suffix) else init for init in graph.initializer]
    nodes = [node for node in graph.node
             if not (node.op_type == "Cast" and node.name.endswith(f"{suffix}__cast"))]
    del graph.initializer[:]
    graph.initializer.extend(restored)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(target))


def is_quantized(path: Path) -> bool:
    """Whether the ONNX graph at `path` holds QuantizeLinear nodes (a QDQ INT8 graph)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type == "QuantizeLinear" for node in graph.node)


# --- detector ----------------------------------------------------------------------------

DETECTOR_BOX_TOLERANCE = 1.0  # model-input pixels
DETECTOR_SCORE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class DetectorParity:
    """What `check_detector_parity` compared: the detections it paired and their largest
    differences (box coordinates in model-input pixels, scores)."""

    detections: int
    box_difference: float
    score_difference: float


def build_untrained_detector(*, backbone: str = "mobilenet_v3_large_fpn",
                             input_size: int = 512, seed: int = 0) -> FractureDetector:
    """A random-weight detector (one label) whose outputs are worth comparing across backends.

    Deterministic for a given seed. Its BatchNorm layers are calibrated (see
    `calibrate_detector`), or backend comparisons mean nothing.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FractureDetector(backbone, num_labels=1, input_size=input_size)
        calibrate_detector(model, input_size)
    return model


def calibrate_detector(model: FractureDetector, input_size: int, batches: int = 2,
                       batch_size: int = 4) -> None:
    """Give an untrained detector's BatchNorm layers statistics from synthetic images.

    Unlike the classifier, a detector calibrated on Gaussian noise is badly conditioned
    on image-like input: measured at 512 px, its FPN features had a standard deviation
    of 92 (max 437) on `synthetic_images`, and float32 rounding alone (against float64)
    then moved scores by up to 0.19 and boxes by pixels. Calibrated on synthetic images,
    the same features had a standard deviation of 1.3 and float32 moved boxes by 1e-3 px
    and scores by 6e-7. Only the BatchNorm layers run in train mode: the detector's
    train-mode forward needs targets and returns losses instead of detections.
    """
    with _batchnorm_calibration(model) as norms:
        model.eval()
        for norm in norms:
            norm.train()
        with torch.no_grad():
            for index in range(batches):
                images = synthetic_images(input_size, batch_size, seed=1000 + index)
                model(torch.from_numpy(to_model_input(images, IMAGENET_MEAN, IMAGENET_STD)))


def export_detector(model: FractureDetector, path: Path, input_size: int) -> None:
    """Export for one image: input `image` (1, 3, S, S), outputs `boxes`, `scores`, `labels`.

    The dynamo exporter is used, on a strict `torch.export` of the model with
    torchvision's batched NMS replaced (see `_guard_free_batched_nms`). Measured against
    the legacy TorchScript exporter (`python -m bench.detector`: MobileNetV3-FPN, 2
    cores, 256 and 512 px): it takes ~20 s to export instead of ~1.5 s, but ONNX
    Runtime runs its graph 1.25-1.4x faster, and its outputs have static shapes
    (1, K, ...) where the legacy graph's K is symbolic; both matched torch to < 1e-3 px
    and < 1e-5 in score. Detection runs on every image a node sees and the export once
    per build, so the faster graph wins. A batch axis cannot be dynamic with either:
    torchvision's detector takes a Python list of images, which export unrolls.

    Strict export is called directly because torch.onnx.export's first attempt,
    non-strict export, fails in torchvision's MultiScaleRoIAlign (len() of a tensor
    whose size depends on the data) and prints a long trace before falling back.
    """
    model.eval()
    example = torch.zeros(1, 3, input_size, input_size)
    with warnings.catch_warnings(), _guard_free_batched_nms():
        # Known and harmless here: torchvision's NMS meta kernel uses a deprecated
        # torch helper, and the anchor generator caches its anchors during tracing.
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=".*create_unbacked_symint")
        warnings.filterwarnings("ignore", category=UserWarning, message=".*side effects")
        program = torch.export.export(model, (example,), strict=True)
        torch.onnx.export(program, (example,), str(path), dynamo=True, external_data=False,
                          verbose=False, input_names=[INPUT_NAME],
                          output_names=list(DETECTOR_OUTPUT_NAMES))


def check_detector_parity(model: FractureDetector, onnx_path: Path, input_size: int, *,
                          images: list[np.ndarray] | None = None, score_floor: float = 0.0,
                          box_tolerance: float = DETECTOR_BOX_TOLERANCE,
                          score_tolerance: float = DETECTOR_SCORE_TOLERANCE) -> DetectorParity:
    """Run the same images through torch and ONNX Runtime; BuildError if they differ.

    `images` are letterboxed display images (S x S, [0, 1]); by default two synthetic
    ones (`synthetic_images`). Detections are paired, not compared slot by slot, since
    near-tied scores can swap places between backends: each torch detection above
    `score_floor` needs an ONNX Runtime one of the same label with every coordinate
    within `box_tolerance` and the score within `score_tolerance`, and the other way
    round. Partners are found by coordinates (within `box_tolerance`, then the closest
    score): what IoU matching amounts to when backends agree to a fraction of a pixel,
    with no IoU threshold of its own to choose. Only a detection at the cut-off (the
    floor, or the K-th score when all K slots are filled) may lack a partner: there a
    near-tie decides which candidate makes the list. Comparing nothing proves nothing,
    so no detection at all above the floor is an error too (pass images this detector
    finds boxes on).
    """
    images = synthetic_images(input_size) if images is None else images
    batch = to_model_input(images, IMAGENET_MEAN, IMAGENET_STD)
    model.eval()
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in model(torch.from_numpy(batch))]
    actual = OnnxRuntimeDetector(onnx_path).run(batch)
    tolerances = f"tolerances {box_tolerance:g} px, {score_tolerance:g} in score"
    paired, box_difference, score_difference = 0, 0.0, 0.0
    for index in range(len(batch)):
        result = _pair_detections([part[index] for part in expected],
                                  [part[index] for part in actual],
                                  score_floor, box_tolerance, score_tolerance)
        if isinstance(result, str):
            raise BuildError(f"{onnx_path}: ONNX Runtime differs from torch on parity "
                             f"image {index}: {result} ({tolerances})")
        paired += result.detections
        box_difference = max(box_difference, result.box_difference)
        score_difference = max(score_difference, result.score_difference)
    if paired == 0:
        raise BuildError(f"{onnx_path}: no detection scored above {score_floor:g} on the "
                         "parity images, so the check compared nothing")
    return DetectorParity(paired, box_difference, score_difference)


def synthetic_images(input_size: int, count: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Bright rectangles of several sizes on a dark noisy background, values in [0, 1].

    Pure noise gives a detector nothing box-like to respond to; rectangles give edges
    and corners at several scales, so proposals and scores vary as on real images.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = rng.uniform(0.0, 0.2, (input_size, input_size)).astype(np.float32)
        for _ in range(5):
            rows, cols = rng.integers(input_size // 25 + 1, input_size // 5 + 2, size=2)
            top = rng.integers(0, input_size - rows + 1)
            left = rng.integers(0, input_size - cols + 1)
            image[top:top + rows, left:left + cols] = rng.uniform(0.6, 1.0)
        images.append(image)
    return images


def _pair_detections(expected: list[np.ndarray], actual: list[np.ndarray], floor: float,
                     box_tolerance: float, score_tolerance: float) -> DetectorParity | str:
    """Pair one image's detections (boxes, scores, labels) from two backends.

    Returns the pairing's figures, or a description of the first detection that has no
    partner although it is clearly above the cut-off.
    """
    (boxes, scores, labels), (other_boxes, other_scores, other_labels) = expected, actual
    cutoff = max(floor, min(float(scores[-1]), float(other_scores[-1])))
    unpaired = set(np.flatnonzero(other_scores > floor).tolist())
    paired, box_difference, score_difference = 0, 0.0, 0.0
    for index in np.flatnonzero(scores > floor):
        distances = np.abs(other_boxes - boxes[index]).max(axis=1)
        candidates = [j for j in unpaired
                      if other_labels[j] == labels[index] and distances[j] <= box_tolerance]
        gaps = {j: abs(float(other_scores[j] - scores[index])) for j in candidates}
        partner = min(gaps, key=gaps.__getitem__, default=None)
        if partner is not None and gaps[partner] <= score_tolerance:
            unpaired.remove(partner)
            paired += 1
            box_difference = max(box_difference, float(distances[partner]))
            score_difference = max(score_difference, gaps[partner])
        elif scores[index] > cutoff + score_tolerance:
            return (f"torch's box {np.round(boxes[index], 2).tolist()} (label "
                    f"{labels[index]}, score {scores[index]:.4f}) has no partner; nearest "
                    f"ONNX Runtime box is {distances.min():.3g} px away")
    for j in sorted(unpaired):
        if other_scores[j] > cutoff + score_tolerance:
            return (f"ONNX Runtime's box {np.round(other_boxes[j], 2).tolist()} (label "
                    f"{other_labels[j]}, score {other_scores[j]:.4f}) has no partner in torch")
    return DetectorParity(paired, box_difference, score_difference)


@contextlib.contextmanager
def _guard_free_batched_nms() -> Iterator[None]:
    """Replace torchvision's batched_nms, for the duration of an export, by a traceable one.

    torchvision's version branches on the number of boxes (an early return when there
    are none, a per-class loop above 4000 coordinates), which depends on the data and
    stops torch.export. The replacement always uses its coordinate trick, with no branch:
    each class's boxes are offset by class * (largest coordinate + 1) so that classes
    never overlap, then one plain NMS runs; the largest coordinate is taken over the
    boxes plus one zero, so that no boxes at all needs no special case. Its callers
    (the RPN and the box heads) look it up as `box_ops.batched_nms` at each call,
    so replacing the module attribute reaches them.
    """
    original = box_ops.batched_nms
    box_ops.batched_nms = _batched_nms_without_guards
    try:
        yield
    finally:
        box_ops.batched_nms = original


def _batched_nms_without_guards(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor,
                                iou_threshold: float) -> torch.Tensor:
    largest = torch.cat([boxes.flatten(), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (largest + 1)
    return box_ops.nms(boxes + offsets[:, None], scores, iou_threshold)
