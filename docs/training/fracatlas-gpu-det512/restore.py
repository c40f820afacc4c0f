"""Restore the detector trained on the H200 (docs/gpu/NOTES.md) as a run of this machine.

Its best.pt came back with float16 weights (a call returns at most 16 MiB per file) and
without calibration (the run's 300 s ended during it). This casts the weights back to
float32, points the record at the data set and split here, and fits the box-score
operating points on the validation part of the original images, as training would have.

    .venv/bin/python docs/training/fracatlas-gpu-det512/restore.py TRANSFERRED.pt RUN
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from fractured.training import checkpoint, config
from fractured.training.data import DetectorImages, letterbox_samples
from fractured.training.datasets import open_dataset
from fractured.training.detector import calibrate
from fractured.training.loops import Device
from fractured.training.splits import load_split

DATASET = Path("../shared/data/fracatlas")
SPLIT = Path("docs/training/fracatlas-resnet18-e50")


def main() -> None:
    transferred, run = Path(sys.argv[1]), Path(sys.argv[2])
    state = torch.load(transferred, map_location="cpu", weights_only=True)
    del state["fp16_for_transfer"]
    state["model"] = {key: value.float() if value.is_floating_point() else value
                      for key, value in state["model"].items()}
    (run / "split").mkdir(parents=True, exist_ok=True)
    for name in ("split.csv", "split.json"):
        shutil.copy(SPLIT / name, run / "split" / name)
    sample_set = open_dataset(DATASET, "fracatlas")
    split = load_split(run / "split", sample_set)
    val = [s for s in split.samples(sample_set, "val") if s.boxes is not None]
    images = letterbox_samples(val, state["model_spec"]["input_size"], desc="decoding val")
    state["provenance"] |= {"dataset": str(DATASET), "split": str(run / "split"),
                            "transferred": "trained on an H200 from JPEG-86 copies of the "
                                           "train and val images (docs/gpu/NOTES.md)"}
    (run / "detector").mkdir(parents=True, exist_ok=True)
    best = run / "detector" / checkpoint.BEST
    checkpoint.save(best, {key: value for key, value in state.items()
                           if key != "format_version"})
    settings = config.from_dict(state["settings"], base=Path.cwd())
    config.save(settings, run / "train.toml")
    spec = state["model_spec"]
    val_set = DetectorImages(images, mean=spec["mean"], std=spec["std"])
    calibrate(best, val_set, settings.detector, Device.choose("cpu", amp=False,
              channels_last=False, cpu_bf16=False), workers=0)
    print(checkpoint.load(best, "detector")["calibration"])


if __name__ == "__main__":
    main()
