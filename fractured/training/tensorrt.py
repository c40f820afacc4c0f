"""Build TensorRT plans from a bundle's ONNX graphs, on the GPU that will run them.

A plan holds kernels chosen and compiled for one GPU with one TensorRT version, so it
is built where it runs (`fractured build-engine` on the node, or an identical machine)
and the bundle records the `PlanTarget` it returns. Plans are FP16 by default, the
precision of the GPU's tensor cores; tests/test_tensorrt.py bounds how far FP16 moves
logits, CAM and boxes from ONNX Runtime's FP32. INT8 comes from the graph itself: a
bundle made by `fractured quantize` holds QDQ graphs (calibrated on training images and
checked against their float32 source), which TensorRT builds as an explicitly
quantized INT8 plan, its other layers FP16.

Written against the TensorRT 10 Python API; tensorrt is imported only when a plan is
built, so this module imports on machines without it.
"""

from __future__ import annotations

from pathlib import Path

from fractured.durable import write_durably
from fractured.engine.backends.tensorrt import (
    PlanTarget,
    plan_is_usable,
    trt_logger,
    unavailable_reason,
)
from fractured.training.export import BuildError, is_quantized

__all__ = ["PlanTarget", "build_plan", "plan_is_usable"]


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

