"""TensorRT backend: the exported graphs compiled into plans for the node's own GPU.

A plan (`*.plan` in a bundle, built by `fractured.training.tensorrt.build_plan`) only
loads with the TensorRT version and the GPU compute capability it was built for, so it
is built on the node (or an identical machine), and `build_plan` returns the
`PlanTarget` it was built for, which `plan_is_usable` compares with this machine's.
These two live here, not with the build, because the node needs them and the engine
must not import the training tools.

tensorrt and torch are optional: both are imported when a plan is opened, never at
module import, so a CPU node can import this module to ask `unavailable_reason()`. torch
provides the GPU memory and the CUDA stream, which spares the node another CUDA binding
(pycuda or cuda-python) next to the one torch already has.

Written against the TensorRT 10 Python API (named I/O tensors, `execute_async_v3`).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fractured.engine.backends.onnxruntime import (
    DETECTOR_OUTPUT_NAMES,
    INPUT_NAME,
    OUTPUT_NAMES,
)
from fractured.engine.bundle import BundleError

NOT_INSTALLED = ("the tensorrt package is not installed "
                 "(pip install 'fractured[tensorrt]' from NVIDIA's index)")
NO_GPU = "no CUDA GPU is visible"


def unavailable_reason() -> str | None:
    """Why this machine cannot run TensorRT plans, or None when it can.

    Asked before opening a plan so that "auto" can fall back to ONNX Runtime and an
    explicit request can fail with the cause instead of an import traceback.
    """
    try:
        import tensorrt  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "tensorrt":
            return NOT_INSTALLED
        return f"the tensorrt package cannot be imported ({exc})"
    except (ImportError, OSError) as exc:  # e.g. a libnvinfer that does not match the CUDA
        return f"the tensorrt package cannot be imported ({exc})"
    try:
        import torch
    except ImportError:
        return "the tensorrt backend needs PyTorch for GPU memory: pip install 'fractured[train]'"
    if not torch.cuda.is_available():
        return NO_GPU
    return None


@dataclass(frozen=True)
class PlanTarget:
    """What a plan was built for: it loads only with the same TensorRT version on a GPU of
    the same compute capability ("8.9"). The GPU's name is kept for the messages and
    for the other-model warning (see `plan_is_usable`)."""

    gpu_name: str
    compute_capability: str
    tensorrt_version: str

    @classmethod
    def current(cls) -> PlanTarget:
        """This machine's target (the current CUDA device); needs tensorrt and a GPU."""
        if reason := unavailable_reason():
            raise RuntimeError(f"no TensorRT target here: {reason}")
        import tensorrt as trt
        import torch

        major, minor = torch.cuda.get_device_capability()
        return cls(gpu_name=torch.cuda.get_device_name(), compute_capability=f"{major}.{minor}",
                   tensorrt_version=trt.__version__)


def plan_is_usable(built_for: PlanTarget, here: PlanTarget) -> tuple[bool, str]:
    """Whether a plan built for `built_for` can run `here`, and what to tell the operator.

    TensorRT refuses a plan from another TensorRT version or for another compute
    capability (the kernels in it are compiled for one), so both must match exactly;
    the reason then names both sides and the fix. Another GPU model of the same compute
    capability loads it, but with kernels tuned for the other model, so it is usable
    with a note. An identical target gives (True, "").
    """
    problems = []
    if built_for.tensorrt_version != here.tensorrt_version:
        problems.append(f"built with TensorRT {built_for.tensorrt_version}, this node has "
                        f"TensorRT {here.tensorrt_version}")
    if built_for.compute_capability != here.compute_capability:
        problems.append(f"built for compute capability {built_for.compute_capability} "
                        f"({built_for.gpu_name}), this GPU has {here.compute_capability} "
                        f"({here.gpu_name})")
    if problems:
        return False, "; ".join(problems) + ": rebuild the plan on this node"
    if built_for.gpu_name != here.gpu_name:
        return True, (f"built on {built_for.gpu_name}, running on {here.gpu_name} (same "
                      f"compute capability {here.compute_capability}); rebuild it here "
                      "for kernels tuned to this GPU")
    return True, ""


@functools.cache
def trt_logger() -> Any:
    """The process's one TensorRT logger (TensorRT treats its logger as a singleton).

    It forwards warnings and errors to the standard `logging` tree (so they reach the
    node's JSON log, not a bare stderr line) and keeps the errors, which TensorRT
    reports only there: a failed deserialize or build returns None, and `take_errors()`
    puts the reason into the exception.
    """
    import tensorrt as trt

    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.DEBUG}
    log = logging.getLogger("fractured.tensorrt")

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, level: Any, message: str) -> None:
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                self.errors.append(message)
            if level in levels:  # VERBOSE (thousands of lines per build) is dropped
                log.log(levels[level], "tensorrt: %s", message)

        def take_errors(self) -> str:
            """The errors logged since the last call, joined; cleared."""
            errors, self.errors = self.errors, []
            return "; ".join(errors) or "TensorRT logged no error"

    return _Logger()


class _Plan:
    """A deserialized plan, one execution context, and the batch limit of its profile.

    `run` splits a batch into chunks the plan accepts (up to the profile's maximum, or
    its static batch: 1 for the detector, which cannot be exported with a dynamic one),
    allocates each chunk's I/O tensors with torch and runs them on a stream of its own
    (TensorRT synchronises extra on the default stream). A lock makes one run at a
    time, because an execution context holds the shapes and addresses of one run.
    """

    def __init__(self, plan_path: str | Path, outputs: tuple[str, ...]) -> None:
        if reason := unavailable_reason():
            raise BundleError(f"{plan_path}: cannot run a TensorRT plan here: {reason}")
        import tensorrt as trt
        import torch

        try:
            data = Path(plan_path).read_bytes()
        except OSError as exc:
            raise BundleError(f"{plan_path}: cannot read the plan ({exc})") from exc
        logger = trt_logger()
        logger.take_errors()
        self._runtime = trt.Runtime(logger)  # must outlive the engine
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BundleError(
                f"{plan_path}: TensorRT {trt.__version__} cannot load this plan on "
                f"{torch.cuda.get_device_name()} ({logger.take_errors()}); a plan loads only "
                "with the TensorRT version and GPU it was built for: rebuild it here")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._all_outputs = [n for n in names if n not in inputs]
        if inputs != [INPUT_NAME] or not set(outputs) <= set(self._all_outputs):
            raise BundleError(f"{plan_path}: expected input {INPUT_NAME!r} and outputs "
                              f"{', '.join(outputs)}; the plan has inputs {inputs}, outputs "
                              f"{self._all_outputs}")
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                  trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64,
                  trt.DataType.BOOL: torch.bool}
        self._dtypes: dict[str, Any] = {}  # torch dtypes
        self._numpy_dtypes: dict[str, np.dtype[Any]] = {}
        self.item_shapes: dict[str, tuple[int, ...]] = {}  # each tensor's shape past the batch
        for name in names:
            dtype, shape = engine.get_tensor_dtype(name), tuple(engine.get_tensor_shape(name))
            if dtype not in dtypes or -1 in shape[1:]:
                raise BundleError(f"{plan_path}: tensor {name!r} is {dtype} of shape {shape}; "
                                  "this backend needs fixed shapes past the batch axis and "
                                  "float, int or bool data")
            self._dtypes[name] = dtypes[dtype]
            self._numpy_dtypes[name] = np.dtype(trt.nptype(dtype))
            self.item_shapes[name] = shape[1:]
        input_shape = tuple(engine.get_tensor_shape(INPUT_NAME))
        self.max_batch = int(engine.get_tensor_profile_shape(INPUT_NAME, 0)[2][0]
                             if input_shape[0] == -1 else input_shape[0])
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BundleError(f"{plan_path}: TensorRT cannot create an execution context "
                              f"({logger.take_errors()})")
        self._engine = engine
        self._outputs = outputs
        self._path = plan_path
        self._logger = logger
        self._torch = torch
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._stream = torch.cuda.Stream(self._device)
        self._lock = threading.Lock()

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The named outputs for a float32 (B, 3, S, S) batch, as numpy arrays."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.shape[1:] != self.item_shapes[INPUT_NAME]:
            raise ValueError(f"{self._path}: expects images of shape "
                             f"{self.item_shapes[INPUT_NAME]}, got a batch {batch.shape}")
        if len(batch) == 0:
            return [np.zeros((0, *self.item_shapes[name]), self._numpy_dtypes[name])
                    for name in self._outputs]
        with self._lock:
            parts = [self._run_chunk(batch[start:start + self.max_batch])
                     for start in range(0, len(batch), self.max_batch)]
        return [np.concatenate(arrays) for arrays in zip(*parts, strict=True)]

    def _run_chunk(self, chunk: np.ndarray) -> list[np.ndarray]:
        torch, context = self._torch, self._context
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            # Every tensor below is made and read on this stream, so the copies in and
            # out are ordered around TensorRT's work on it; `.cpu()` waits for the end.
            image = torch.from_numpy(chunk).to(self._device, self._dtypes[INPUT_NAME])
            if not context.set_input_shape(INPUT_NAME, tuple(image.shape)):
                raise RuntimeError(f"{self._path}: TensorRT refused input shape "
                                   f"{tuple(image.shape)} ({self._logger.take_errors()})")
            context.set_tensor_address(INPUT_NAME, image.data_ptr())
            buffers = {}
            for name in self._all_outputs:
                buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)),
                                            dtype=self._dtypes[name], device=self._device)
                context.set_tensor_address(name, buffers[name].data_ptr())
            if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
                raise RuntimeError(f"{self._path}: TensorRT failed to run the plan "
                                   f"({self._logger.take_errors()})")
            return [buffers[name].cpu().numpy() for name in self._outputs]


class TensorRTClassifier:
    """A classifier plan (input `image` with a dynamic batch; outputs `logits`, `cam`).

    Batches larger than the plan's profile allows (`max_batch`, fixed at build) are run
    in pieces, so the pipeline's batch size need not match the build's.
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | Path) -> None:
        self._plan = _Plan(plan_path, OUTPUT_NAMES)
        self.max_batch = self._plan.max_batch

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, cam = self._plan.run(batch)
        return logits.astype(np.float32, copy=False), cam.astype(np.float32, copy=False)


class TensorRTDetector:
    """A detector plan (one image per run, like the ONNX graph it came from; outputs
    `boxes`, `scores`, `labels` with a fixed K per image): `run` loops over the batch."""

    name = "tensorrt"

    def __init__(self, plan_path: str | Path) -> None:
        self._plan = _Plan(plan_path, DETECTOR_OUTPUT_NAMES)
        self.detections_per_image: int = self._plan.item_shapes["scores"][-1]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        boxes, scores, labels = self._plan.run(batch)
        return (boxes.astype(np.float32, copy=False), scores.astype(np.float32, copy=False),
                labels.astype(np.int64, copy=False))
