"""Training throughput: classifier backbones, float32 against bfloat16 autocast, on this CPU.

Which backbone can be trained to a useful model on the hardware ML staff have decides
what ships: a 2-core CPU epoch of EfficientNet-B0 takes minutes, and bf16 matrix units
speed some networks up and not others. For each variant at its input size, the same
training step (forward, FractureLoss, backward, AdamW) is timed on the same random
batch in float32 and under `[run].cpu_bf16`'s autocast, in alternating blocks in one
process, and the images/s of each and their ratio are printed, with each variant's
float32 speed relative to the first one listed (EfficientNet-B0, the product's default).

    .venv/bin/python -m bench.training [--variants b0,resnet18,resnet34] [--size 224]
        [--batch 32] [--steps 3] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fractured.engine.models import INPUT_SIZES, FractureClassifier
from fractured.training import config
from fractured.training.loops import Device
from fractured.training.losses import FractureLoss
from fractured.training.schedule import optimiser


def step_seconds(variant: str, size: int, batch: int, steps: int, rounds: int,
                 ) -> dict[str, float]:
    """Median seconds per training step, float32 and bf16, alternating blocks of steps."""
    torch.manual_seed(0)
    model = FractureClassifier(variant=variant, num_labels=1)
    optimizer = optimiser(model.parameters(), config.load(None).classifier)
    loss_fn = FractureLoss()
    images = torch.rand(batch, 3, size, size)
    labels = (torch.arange(batch) % 2).float()
    devices = {"float32": Device.choose("cpu", amp=False, channels_last=False),
               "bfloat16": Device.choose("cpu", amp=False, channels_last=False,
                                         cpu_bf16=True)}
    times: dict[str, list[float]] = {name: [] for name in devices}
    model.train()
    for round_ in range(rounds + 1):  # the first round warms up and is not counted
        for name, device in devices.items():
            began = time.perf_counter()
            for _ in range(steps):
                with device.autocast(training=True):
                    logits, _ = model(images)
                    loss = loss_fn(logits[:, 0], labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if round_:
                times[name].append((time.perf_counter() - began) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="b0,resnet18,resnet34")
    parser.add_argument("--size", type=int, default=0, help="0 = each variant's own")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
          f"median of {args.rounds} blocks of {args.steps} steps")
    print(f"{'variant':<10} {'size':>5} {'fp32 img/s':>11} {'bf16 img/s':>11} "
          f"{'bf16/fp32':>10} {'fp32 vs 1st':>11}")
    reference = None
    for variant in args.variants.split(","):
        size = args.size or INPUT_SIZES[variant]
        seconds = step_seconds(variant, size, args.batch, args.steps, args.rounds)
        fp32, bf16 = (args.batch / seconds[name] for name in ("float32", "bfloat16"))
        reference = reference or fp32
        print(f"{variant:<10} {size:>5} {fp32:>11.1f} {bf16:>11.1f} {bf16 / fp32:>9.2f}x "
              f"{fp32 / reference:>10.2f}x")


if __name__ == "__main__":
    main()
