"""`fractured build-engine --untrained`: a bundle of random weights.

For wiring, tests and first installs before a model is trained: the graphs are
exported and checked as a trained model's are, and the manifest says trained=false,
which every result made with it shows.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    CLASSIFIER_WEIGHTS,
    DETECTOR_FILE,
    DETECTOR_WEIGHTS,
    FRACTURE_LABEL,
    ClassifierSpec,
    DetectorSpec,
)
from fractured.engine.findings import OperatingPoints
from fractured.engine.models import INPUT_SIZES, FractureClassifier
from fractured.training.build.writer import new_manifest, write
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
from fractured.training.tensorrt import add_plans


def build_untrained_bundle(out_dir: Path, *, name: str = "fractured-untrained",
                           version: str = "0.0.0", variant: str = "b0",
                           input_size: int | None = None, detector: str | None = None,
                           detector_input_size: int = 512, seed: int = 0,
                           tensorrt: bool | None = False) -> Path:
    """Build a bundle with random weights, for wiring and tests before a model is trained.

    `input_size` defaults to the variant's native size (224 for b0); `detector` names a
    Faster R-CNN backbone (see DETECTOR_BACKBONES) to include one. The bundle holds the
    ONNX graphs and the torch weights they came from (for the torch backend). The
    manifest says trained=false, which every result made with it shows as "UNTRAINED
    MODEL"; its operating points are placeholders, chosen on no data. `tensorrt` as in
    `build.checkpoints.build_bundle` (default False: plans only when asked for).
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
            detector_spec = DetectorSpec(
                architecture=boxer.architecture, backbone=detector, labels=(FRACTURE_LABEL,),
                input_size=detector_input_size,
                detections_per_image=boxer.detections_per_image,
                operating_points=OperatingPoints(0.5, 0.8))
        manifest = new_manifest(
            name, version, trained=False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            classifier=ClassifierSpec(
                architecture=model.architecture, variant=variant, labels=(FRACTURE_LABEL,),
                input_size=size, temperature=1.0,
                operating_points=OperatingPoints(0.4, 0.6)),
            detector=detector_spec,
            training={"note": "random weights, never trained", "seed": seed})
        manifest = add_plans(manifest, files, Path(scratch), required=tensorrt)
        return write(out_dir, manifest, files, dataset=None)
