"""Detector export: the dynamo exporter (what builds use) against the legacy one.

For an untrained MobileNetV3-FPN (or ResNet50-FPN v2) detector: seconds to export,
ONNX size, ms per image in torch eager and in ONNX Runtime (interleaved runs, so load
from other processes hits every contender alike), and how far each graph's outputs are
from torch's. The legacy graph is exported here only
for comparison.

    .venv/bin/python -m bench.detector [--size 512] [--backbone mobilenet_v3_large_fpn]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from fractured.engine.backends.onnxruntime import DETECTOR_OUTPUT_NAMES, INPUT_NAME
from fractured.engine.models import DETECTOR_BACKBONES
from fractured.engine.preprocess import to_model_input
from fractured.training.export import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ONNX_OPSET,
    build_untrained_detector,
    check_detector_parity,
    export_detector,
    synthetic_images,
)


def export_legacy(model: torch.nn.Module, path: Path, size: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), str(path), dynamo=False,
                          opset_version=ONNX_OPSET, input_names=[INPUT_NAME],
                          output_names=list(DETECTOR_OUTPUT_NAMES))


def differences(model: torch.nn.Module, session: ort.InferenceSession,
                batch: np.ndarray) -> tuple[float, float]:
    """Largest distance (px) from a torch box to the nearest ORT box, and largest
    difference between the sorted score lists: simple figures any graph can be given
    (the legacy graph's K is not static, so OnnxRuntimeDetector refuses it)."""
    box_gap = score_gap = 0.0
    for image in batch:
        with torch.no_grad():
            boxes, scores, _ = (part[0].numpy() for part in model(torch.from_numpy(image[None])))
        other_boxes, other_scores, _ = (part[0] for part in session.run(
            list(DETECTOR_OUTPUT_NAMES), {INPUT_NAME: image[None]}))
        found = scores > 0
        nearest = np.abs(boxes[found][:, None] - other_boxes[None]).max(axis=2).min(axis=1)
        box_gap = max(box_gap, float(nearest.max()))
        score_gap = max(score_gap, float(np.abs(np.sort(scores) - np.sort(other_scores)).max()))
    return box_gap, score_gap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--backbone", choices=DETECTOR_BACKBONES,
                        default="mobilenet_v3_large_fpn")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT threads")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)

    start = time.perf_counter()
    model = build_untrained_detector(backbone=args.backbone, input_size=args.size)
    print(f"{args.backbone} at {args.size} px: built and calibrated in "
          f"{time.perf_counter() - start:.1f} s")
    batch = to_model_input(synthetic_images(args.size, 1, seed=5), IMAGENET_MEAN, IMAGENET_STD)
    parity_batch = to_model_input(synthetic_images(args.size, 8, seed=11), IMAGENET_MEAN,
                                  IMAGENET_STD)
    runs: dict[str, Callable[[], object]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-detector-") as scratch:
        for name, export in (("dynamo", export_detector), ("legacy", export_legacy)):
            path = Path(scratch) / f"{name}.onnx"
            start = time.perf_counter()
            export(model, path, args.size)
            elapsed = time.perf_counter() - start
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            session = ort.InferenceSession(str(path), options,
                                           providers=["CPUExecutionProvider"])
            box_gap, score_gap = differences(model, session, parity_batch)
            print(f"  {name:<6} export {elapsed:5.1f} s  {path.stat().st_size / 1e6:5.1f} MB  "
                  f"vs torch: nearest box <= {box_gap:.3g} px, sorted scores <= {score_gap:.2g}")
            runs[f"ORT {name}"] = lambda session=session: session.run(
                None, {INPUT_NAME: batch})
        parity = check_detector_parity(model, Path(scratch) / "dynamo.onnx", args.size)
        print(f"  dynamo graph passes the build's parity check: {parity}")

        tensor = torch.from_numpy(batch)

        def torch_run() -> object:
            with torch.no_grad():
                return model(tensor)

        runs["torch eager"] = torch_run
        times: dict[str, list[float]] = {name: [] for name in runs}
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    for name, measured in times.items():
        print(f"  {name:<12} median {statistics.median(measured) * 1e3:6.1f} ms/image  "
              f"min {min(measured) * 1e3:6.1f}")
    ratio = np.median(times["ORT legacy"]) / np.median(times["ORT dynamo"])
    print(f"  ORT legacy / dynamo: {ratio:.2f}x the time")


if __name__ == "__main__":
    main()
