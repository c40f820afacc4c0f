"""ONNX Runtime backend: the default, with no torch needed on the node.

On CPU it runs the classifier 2-3x faster than torch eager (`python -m bench.engine`);
with the onnxruntime-gpu package installed it uses CUDA instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from fractured.engine.bundle import BundleError
from fractured.engine.region_check import DISTANCES_OUTPUT

INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "cam")
DETECTOR_OUTPUT_NAMES = ("boxes", "scores", "labels")


class OnnxRuntimeClassifier:
    """An ONNX Runtime session over a classifier graph with input `image`, outputs
    `logits` and `cam`.

    `threads` caps the intra-op thread pool (None: ONNX Runtime's default, one per
    core), so the node can leave cores to the DICOM receiver and the database.
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: int | None = None) -> None:
        self._session = _open_session(model_path, threads, OUTPUT_NAMES)
        self.provider: str = self._session.get_providers()[0]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        logits, cam = self._session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return logits, cam


class OnnxRuntimeRegionCheck:
    """An ONNX Runtime session over a region check graph (engine.region_check): input
    `image`, the classifier's normalised batch; output `distances` (B, classes). It runs
    here whatever backend runs the models: only images whose header cannot say what
    they show pass through it."""

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: int | None = None) -> None:
        self._session = _open_session(model_path, threads, (DISTANCES_OUTPUT,))

    def run(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        (distances,) = self._session.run([DISTANCES_OUTPUT], {INPUT_NAME: batch})
        return distances


class OnnxRuntimeDetector:
    """An ONNX Runtime session over a detector graph with input `image` (one image),
    outputs `boxes`, `scores` and `labels` (a fixed K per image).

    torchvision's Faster R-CNN cannot be exported with a dynamic batch (it loops over a
    Python list of images), so the graph takes one image and `run` loops over the
    batch. That costs nothing on a CPU: a graph exported for two images took as long
    per image as two runs of the one-image graph. `threads` as for the classifier.
    """

    name = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: int | None = None) -> None:
        self._session = _open_session(model_path, threads, DETECTOR_OUTPUT_NAMES)
        self.provider: str = self._session.get_providers()[0]
        outputs = {node.name: node.shape for node in self._session.get_outputs()}
        detections = outputs["scores"][-1]
        if not isinstance(detections, int):
            raise BundleError(f"{model_path}: output 'scores' has shape {outputs['scores']}; "
                              "expected a fixed number of detections per image")
        self.detections_per_image: int = detections

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) == 0:
            k = self.detections_per_image
            return (np.zeros((0, k, 4), np.float32), np.zeros((0, k), np.float32),
                    np.zeros((0, k), np.int64))
        results = [self._session.run(list(DETECTOR_OUTPUT_NAMES), {INPUT_NAME: image[None]})
                   for image in batch]
        boxes, scores, labels = (np.concatenate(part) for part in zip(*results, strict=True))
        return boxes, scores, labels


def _open_session(model_path: str | Path, threads: int | None,
                  output_names: tuple[str, ...]) -> ort.InferenceSession:
    """A session over `model_path`; BundleError if it cannot load or has other names.

    The names are checked at load time so that a graph from another build (or of the
    other model) is refused when the node starts, not on the first study.
    """
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types for a bad model
        raise BundleError(f"{model_path}: ONNX Runtime cannot load it ({exc})") from exc
    inputs = [node.name for node in session.get_inputs()]
    outputs = [node.name for node in session.get_outputs()]
    if inputs != [INPUT_NAME] or not set(output_names) <= set(outputs):
        raise BundleError(f"{model_path}: expected input {INPUT_NAME!r} and outputs "
                          f"{', '.join(output_names)}; the graph has inputs {inputs}, "
                          f"outputs {outputs}")
    return session
