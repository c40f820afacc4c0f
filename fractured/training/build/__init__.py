"""Build engine bundles: export the models (training.export), write the bundle.

A bundle holds the ONNX graphs, the torch weights they came from, a manifest that says
what they are and a model card; `engine.bundle.write_bundle` makes it immutable and
checksummed. Four build modes, each a small builder that makes a typed
`engine.bundle.Manifest` and the files it names, all written by one writer
(build.writer):

- checkpoints: a trained bundle from `fractured train` checkpoints, or with one model
  taken from an existing bundle (build.parts: each model's entry and files);
- untrained: random weights, for tests and first installs;
- derived: the bundles `fractured fuse` and `fractured quantize` make from another.

build.records holds what the manifest's free-form `training` record says: the
checkpoints' summaries, the held-out scores and the notes.
"""

from __future__ import annotations

from fractured.training.build.checkpoints import build_bundle
from fractured.training.build.derived import (
    CardRecord,
    build_fused_bundle,
    build_quantized_bundle,
    build_refitted_region_check,
)
from fractured.training.build.untrained import build_untrained_bundle

__all__ = [
    "CardRecord",
    "build_bundle",
    "build_fused_bundle",
    "build_quantized_bundle",
    "build_refitted_region_check",
    "build_untrained_bundle",
]
