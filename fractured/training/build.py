"""Build engine bundles: export the models (training.export), write the bundle.

A bundle holds the ONNX graphs, the torch weights they came from and a manifest that
says what they are; `engine.bundle.write_bundle` makes it immutable and checksummed.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    CLASSIFIER_WEIGHTS,
    DETECTOR_FILE,
    DETECTOR_WEIGHTS,
    FRACTURE_LABEL,
    SCHEMA_VERSION,
    write_bundle,
)
from fractured.engine.models import INPUT_SIZES, FractureClassifier
from fractured.training.export import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_untrained_detector,
    calibrate_batchnorm,
    check_detector_parity,
    check_parity,
    export_classifier,
    export_detector,
)


def build_untrained_bundle(out_dir: Path, *, name: str = "fractured-untrained",
                           version: str = "0.0.0", variant: str = "b0",
                           input_size: int | None = None, detector: str | None = None,
                           detector_input_size: int = 512, seed: int = 0) -> Path:
    """Build a bundle with random weights, for wiring and tests before a model is trained.

    `input_size` defaults to the variant's native size (224 for b0); `detector` names a
    Faster R-CNN backbone (see DETECTOR_BACKBONES) to include one. The bundle holds the
    ONNX graphs and the torch weights they came from (for the torch backend). The
    manifest says trained=false, which every result made with it shows as "UNTRAINED
    MODEL"; its operating points are placeholders, chosen on no data.
    """
    size = INPUT_SIZES[variant] if input_size is None else input_size
    if size < 32:
        raise ValueError(f"input_size must be at least 32 (the backbone's stride), got {size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FractureClassifier(variant=variant, num_labels=1)
        calibrate_batchnorm(model, size)
    with tempfile.TemporaryDirectory(prefix="fractured-build-") as scratch:
        files = {CLASSIFIER_FILE: Path(scratch) / CLASSIFIER_FILE,
                 CLASSIFIER_WEIGHTS: Path(scratch) / CLASSIFIER_WEIGHTS}
        export_classifier(model, files[CLASSIFIER_FILE], size)
        check_parity(model, files[CLASSIFIER_FILE], size)
        torch.save(model.state_dict(), files[CLASSIFIER_WEIGHTS])
        detector_spec = None
        if detector is not None:
            boxer = build_untrained_detector(backbone=detector, input_size=detector_input_size,
                                             seed=seed)
            files[DETECTOR_FILE] = Path(scratch) / DETECTOR_FILE
            files[DETECTOR_WEIGHTS] = Path(scratch) / DETECTOR_WEIGHTS
            export_detector(boxer, files[DETECTOR_FILE], detector_input_size)
            check_detector_parity(boxer, files[DETECTOR_FILE], detector_input_size)
            torch.save(boxer.state_dict(), files[DETECTOR_WEIGHTS])
            detector_spec = {
                "architecture": boxer.architecture, "backbone": detector,
                "labels": [FRACTURE_LABEL], "input_size": detector_input_size,
                "detections_per_image": boxer.detections_per_image,
                "operating_points": {"high_sensitivity": 0.5, "high_specificity": 0.8},
            }
        write_bundle(out_dir, {
            "schema_version": SCHEMA_VERSION,
            "name": name,
            "version": version,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "trained": False,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "classifier": {
                "architecture": model.architecture, "variant": variant,
                "labels": [FRACTURE_LABEL], "input_size": size, "temperature": 1.0,
                "operating_points": {"high_sensitivity": 0.4, "high_specificity": 0.6},
            },
            "detector": detector_spec,
            "backends": ["onnxruntime", "torch"],
            "training": {"note": "random weights, never trained", "seed": seed},
        }, files)
    return Path(out_dir)
