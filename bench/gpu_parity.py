"""A trained bundle on the GPU against ONNX Runtime on the CPU, over real images.

bench/engine.py and tests/gpu/test_cuda.py hold the torch backend's CUDA path to the CPU on
random-weight models and synthetic images; trained weights have other ranges (FP16 can
overflow where random ones never reach), so this runs a bundle that keeps its torch
weights (build-engine from checkpoints) over a part of the split it was trained on, with
both pipelines the node can choose between on a GPU machine without TensorRT:

    python -m bench.gpu_parity engines/fractured-0.6.0 --split runs/x/split --part val

and prints how far they are apart: calibrated logits, best box scores, probabilities,
decisions at both operating points, the reported boxes, and each one's ROC AUC.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline
from fractured.training.bundle_scoring import changes, measure, open_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--split", type=Path, required=True, help="the run's split folder")
    parser.add_argument("--dataset", type=Path, help="default: the bundle's training record's")
    parser.add_argument("--part", choices=("train", "val", "test"), default="val")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images")
    parser.add_argument("--threads", type=int, default=4, help="ONNX Runtime's threads")
    args = parser.parse_args()

    import torch
    from sklearn.metrics import roc_auc_score

    if not torch.cuda.is_available():
        parser.error(f"no CUDA GPU visible to torch {torch.__version__}")
    bundle = Bundle.load(args.bundle)
    samples = open_split(bundle, args.split, args.dataset).parts[args.part]
    samples = samples[:args.limit] if args.limit else samples
    pipelines = {"torch cuda": Pipeline(bundle, "torch", boxes="always", device="cuda"),
                 "onnxruntime cpu": Pipeline(bundle, "onnxruntime", threads=args.threads,
                                             boxes="always")}
    started = time.perf_counter()
    measured = measure(pipelines, samples, desc=args.part)
    gpu, cpu = measured["torch cuda"], measured["onnxruntime cpu"]
    spec = bundle.manifest.classifier
    print(f"{bundle.path.name}: {len(gpu.samples)} {args.part} images "
          f"({len(gpu.unreadable)} unreadable), {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; {time.perf_counter() - started:.0f} s")
    p_gpu = spec.probability(gpu.evidence[:, 0], gpu.evidence[:, 1])
    p_cpu = spec.probability(cpu.evidence[:, 0], cpu.evidence[:, 1])
    points = {"high_sensitivity": spec.operating_points.high_sensitivity,
              "high_specificity": spec.operating_points.high_specificity}
    moved = changes(cpu, gpu, p_cpu, p_gpu, points)
    print(f"  finite: {np.isfinite(gpu.evidence).all()} (gpu), "
          f"{np.isfinite(cpu.evidence).all()} (cpu)")
    print(f"  largest |gpu - cpu|: calibrated logit {moved['max_logit_change']:.2g}, best box "
          f"score {moved['max_box_score_change']:.2g}, probability "
          f"{moved['max_probability_change']:.2g}")
    for name, changed in moved["decisions_changed"].items():
        print(f"  decisions changed at {name} ({points[name]:.3f}): {changed} of {len(p_gpu)}")
    counts = [(int((d.scores > 0).sum()), int((c.scores > 0).sum()))
              for d, c in zip(gpu.detections, cpu.detections, strict=True)]
    same = [i for i, (a, b) in enumerate(counts) if a == b]
    gaps = [float(np.abs(gpu.detections[i].boxes[: counts[i][0]]
                         - cpu.detections[i].boxes[: counts[i][1]]).max(initial=0.0))
            for i in same]
    print(f"  detector: same box count on {len(same)} of {len(counts)} images; there, boxes "
          f"<= {max(gaps, default=0.0):.2g} model px apart (median image "
          f"{np.median(gaps) if gaps else 0.0:.2g})")
    if 0 < gpu.labels.sum() < len(gpu.labels):
        print(f"  ROC AUC: gpu {roc_auc_score(gpu.labels, p_gpu):.4f}, "
              f"cpu {roc_auc_score(cpu.labels, p_cpu):.4f}")


if __name__ == "__main__":
    main()
