"""Build TensorRT plans from a bundle's ONNX graphs, on the GPU that will run them.

A plan holds kernels chosen and compiled for one GPU with one TensorRT version, so it
is built where it runs (`fractured build-engine` on the node, or an identical machine)
and the bundle records the `PlanTarget` it returns. Plans are FP16 by default, the
precision of the GPU's tensor cores; tests/gpu/test_tensorrt.py bounds how far FP16 moves
logits, CAM and boxes from ONNX Runtime's FP32. INT8 comes from the graph itself: a
bundle made by `fractured quantize` holds QDQ graphs (calibrated on training images and
checked against their float32 source), which TensorRT builds as an explicitly
quantized INT8 plan, its other layers FP16.

`add_plans` is build-engine's step: where TensorRT runs it builds a plan of each of the
bundle's graphs, checks it against ONNX Runtime on the same inputs (refusing the build
past tolerance, as the ONNX graphs are refused against PyTorch), and records the target
in the manifest, which the node compares with its own GPU before it uses the plans.

Written against the TensorRT 10 Python API; tensorrt is imported only when a plan is
built, so this module imports on machines without it.
"""

from __future__ import annotations

import types
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import structlog

from fractured.durable import write_durably
from fractured.engine.backends.tensorrt import (
    PlanTarget,
    plan_is_usable,
    trt_logger,
    unavailable_reason,
)
from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    CLASSIFIER_PLAN,
    DETECTOR_FILE,
    DETECTOR_PLAN,
    Manifest,
)
from fractured.engine.preprocess import to_model_input
from fractured.training.export import BuildError, is_quantized, synthetic_images

__all__ = ["PlanTarget", "add_plans", "build_plan", "plan_is_usable"]

log = structlog.get_logger()
#: An FP16 plan's outputs against ONNX Runtime's FP32 ones: within this share of the
#: output's scale (its largest magnitude, at least 1); a box's score within it too.
PLAN_TOLERANCE = 5e-2
#: ... and a box's corners within this many model-input pixels.
PLAN_BOX_PIXELS = 2.0
#: Synthetic images each plan is checked on.
PLAN_CHECK_IMAGES = 2


def add_plans(manifest: Manifest, files: dict[str, Path], scratch: Path, *,
              required: bool | None = None) -> Manifest:
    """Build and check a TensorRT plan of each ONNX graph in `files` (into `scratch`,
    added to `files`); the manifest that records them (`backends` gains tensorrt;
    `tensorrt` says what they were built for), or `manifest` itself where none was
    built. `required`: None builds them where TensorRT runs and logs why not
    elsewhere; True makes a machine without TensorRT a BuildError; False skips them."""
    if required is False:
        return manifest
    if reason := unavailable_reason():
        if required:
            raise BuildError(f"cannot build TensorRT plans here: {reason}")
        log.info("build.step", step="TensorRT plans skipped", reason=reason)
        return manifest
    graphs = {CLASSIFIER_PLAN: ("classifier", CLASSIFIER_FILE, manifest.classifier.input_size)}
    if manifest.detector is not None:
        graphs[DETECTOR_PLAN] = ("detector", DETECTOR_FILE, manifest.detector.input_size)
    for plan, (kind, graph, size) in graphs.items():
        log.info("build.step", step=f"build and check the {kind}'s TensorRT plan")
        files[plan] = scratch / plan
        build_plan(files[graph], files[plan])
        batch = to_model_input(synthetic_images(size, PLAN_CHECK_IMAGES), manifest.mean,
                               manifest.std)
        check_plan(kind, files[graph], files[plan], batch)
    # one target for every plan: all were built here
    return replace(manifest, backends=(*manifest.backends, "tensorrt"),
                   tensorrt=types.MappingProxyType(asdict(PlanTarget.current())))


def check_plan(kind: str, graph: Path, plan: Path, batch: np.ndarray) -> None:
    """BuildError when the plan at `plan` computes other outputs than ONNX Runtime runs
    the graph at `graph` to, on `batch`, past PLAN_TOLERANCE / PLAN_BOX_PIXELS."""
    from fractured.engine.backends.onnxruntime import (
        OnnxRuntimeClassifier,
        OnnxRuntimeDetector,
    )
    from fractured.engine.backends.tensorrt import TensorRTClassifier, TensorRTDetector

    if kind == "classifier":
        actual = TensorRTClassifier(plan).run(batch)
        expected = OnnxRuntimeClassifier(graph).run(batch)
        for name, got, want in zip(("logits", "CAM"), actual, expected, strict=True):
            difference, allowed = output_gap(got, want)
            if difference > allowed:
                raise BuildError(f"{plan}: the plan's {name} differ from ONNX Runtime's by "
                                 f"{difference:.3g}, more than the {allowed:.3g} allowed")
        return
    actual, expected = TensorRTDetector(plan).run(batch), OnnxRuntimeDetector(graph).run(batch)
    for image in range(len(batch)):
        mine = [part[image] for part in actual]
        theirs = [part[image] for part in expected]
        for reference, other, lacking in ((theirs, mine, "the plan lacks"),
                                          (mine, theirs, "ONNX Runtime lacks")):
            missing, _ = unpaired_boxes(reference, other)
            if missing:
                raise BuildError(f"{plan}: image {image}: boxes {lacking}: "
                                 + "; ".join(missing))


def output_gap(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """The largest difference of two outputs, and what PLAN_TOLERANCE allows for them."""
    if actual.shape != expected.shape:
        return float("inf"), 0.0
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    return float(np.abs(actual - expected).max(initial=0.0)), PLAN_TOLERANCE * scale


def unpaired_boxes(reference: list[np.ndarray], other: list[np.ndarray],
                   ) -> tuple[list[str], int]:
    """Detections (boxes, scores, labels of one image) of `reference` with no detection
    in `other` of the same label, every corner within PLAN_BOX_PIXELS and the score
    within PLAN_TOLERANCE; and how many were checked. Detections near the last slot's
    score are not checked: there a near-tie decides which makes the fixed-K list."""
    (boxes, scores, labels), (other_boxes, other_scores, other_labels) = reference, other
    if not len(scores) or not len(other_scores):
        return [], 0
    cutoff = max(0.05, float(min(scores[-1], other_scores[-1]))) + PLAN_TOLERANCE
    missing, checked = [], 0
    for index in np.flatnonzero(scores > cutoff):
        checked += 1
        near = ((other_labels == labels[index])
                & (np.abs(other_boxes - boxes[index]).max(axis=1) <= PLAN_BOX_PIXELS)
                & (np.abs(other_scores - scores[index]) <= PLAN_TOLERANCE))
        if not near.any():
            missing.append(f"{np.round(boxes[index], 1).tolist()} score {scores[index]:.3f}")
    return missing, checked


def build_plan(onnx_path: Path, plan_path: Path, *, fp16: bool = True, max_batch: int = 8,
               opt_batch: int | None = None, workspace_gb: float = 2.0) -> PlanTarget:
    """Compile `onnx_path` into a TensorRT plan at `plan_path`; returns what it is built for.

    A dynamic batch axis (the classifier's) gets one optimization profile from 1 to
    `max_batch` images (the node's `[engine].max_batch`: larger batches are split by
    the backend), tuned for `opt_batch` (default `max_batch`, the batch under load, when
    speed matters most); the other dimensions are the graph's own, and must be static.
    A graph with a static batch (the detector's, one image) needs no profile.
    `workspace_gb` caps the scratch memory TensorRT may use while choosing kernels.

    The plan is written to a temporary file beside `plan_path`, flushed and renamed, so a
    failed or interrupted build never leaves a partial plan under the final name.
    BuildError names the file and what TensorRT reported (every ONNX parser error).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    opt_batch = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt_batch} and {max_batch}")
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be positive, got {workspace_gb}")
    if reason := unavailable_reason():
        raise BuildError(f"{onnx_path}: cannot build a TensorRT plan here: {reason}")
    if not Path(onnx_path).is_file():
        raise BuildError(f"{onnx_path}: no such file")
    import tensorrt as trt

    logger = trt_logger()
    logger.take_errors()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser refused the graph: "
                         + ("; ".join(errors) or logger.take_errors()))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if is_quantized(Path(onnx_path)):  # QDQ nodes: their scales, not a calibrator, rule
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    dynamic = False
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if -1 in shape[1:]:
            raise BuildError(f"{onnx_path}: input {tensor.name!r} has shape {shape}; only "
                             "the batch axis may be dynamic")
        if shape[0] == -1:
            item = shape[1:]
            profile.set_shape(tensor.name, (1, *item), (opt_batch, *item), (max_batch, *item))
            dynamic = True
    if dynamic:
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build a plan "
                         f"({logger.take_errors()})")
    write_durably(Path(plan_path), memoryview(serialized), mode=0o644)
    return PlanTarget.current()

