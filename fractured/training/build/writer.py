"""The one writer of every build mode: a new manifest, its model card, the bundle.

Each builder (checkpoints, untrained, derived) makes a typed `Manifest` and the files it
names; `write` writes the card from that manifest and hands both to
`engine.bundle.write_bundle`, which checks the manifest as the node reads it, adds the
checksums and makes the bundle immutable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fractured.engine.bundle import (
    MODEL_CARD_FILE,
    SCHEMA_VERSION,
    ClassifierSpec,
    DetectorSpec,
    Manifest,
    Preprocessing,
    write_bundle,
)
from fractured.engine.exposed_field import NO_CROP
from fractured.engine.findings import OperatingPoints
from fractured.engine.intended_use import IntendedUse
from fractured.training.model_card import dataset_credits, model_card


def new_manifest(name: str, version: str, *, trained: bool, mean: Sequence[float],
                 std: Sequence[float], classifier: ClassifierSpec,
                 detector: DetectorSpec | None, training: Mapping[str, Any],
                 backends: tuple[str, ...] = ("onnxruntime", "torch"),
                 tensorrt: Mapping[str, str] | None = None, crop: str = NO_CROP,
                 detector_crop: str | None = None,
                 intended_use: IntendedUse | None = None) -> Manifest:
    """A manifest created now, without files (write_bundle adds their checksums); the
    ONNX graphs are always in the bundle, the torch weights where `backends` has torch.
    `tensorrt` records what the plans among them were built for; the crops are
    recorded as `Preprocessing.of` says."""
    return Manifest(schema_version=SCHEMA_VERSION, name=name, version=version,
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    trained=trained, mean=triple(mean), std=triple(std),
                    classifier=classifier, detector=detector, files={}, backends=backends,
                    training=training, tensorrt=tensorrt,
                    preprocessing=Preprocessing.of(crop, detector_crop),
                    intended_use=intended_use)


def write(out_dir: Path, manifest: Manifest, files: Mapping[str, str | Path], *,
          dataset: Path | None) -> Path:
    """The bundle at `out_dir`: `files`, and the model card written from `manifest` with
    the credits of the data set at `dataset`."""
    with tempfile.TemporaryDirectory(prefix="fractured-card-") as scratch:
        card = Path(scratch) / MODEL_CARD_FILE
        card.write_text(model_card(manifest.to_dict(), dataset_credits(dataset)),
                        encoding="utf-8")
        write_bundle(out_dir, manifest, {**files, MODEL_CARD_FILE: card})
    return Path(out_dir)


def triple(values: Sequence[float]) -> tuple[float, float, float]:
    """Input normalisation (mean or std) as the manifest holds it."""
    first, second, third = values
    return (float(first), float(second), float(third))


def points(data: Mapping[str, float]) -> OperatingPoints:
    """Operating points from their plain form (a calibration's record)."""
    return OperatingPoints(float(data["high_sensitivity"]), float(data["high_specificity"]))
