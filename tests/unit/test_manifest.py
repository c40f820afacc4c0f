"""The manifest's one type, both ways: what `Manifest.from_dict` reads, `to_dict` writes
back as it was, for every shipped bundle and for a manifest built in memory."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    MANIFEST_FILE,
    Bundle,
    Manifest,
    Preprocessing,
    write_bundle,
)
from fractured.engine.exposed_field import EXPOSED_FIELD, NO_CROP
from tests.paths import REPO

ENGINES = REPO / "engines"
SHIPPED = sorted(path for path in ENGINES.iterdir() if (path / MANIFEST_FILE).is_file())


def test_there_are_shipped_bundles_to_check() -> None:
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_a_shipped_manifest_is_written_back_as_it_is_on_disk(path: Path) -> None:
    on_disk = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    manifest = Bundle.load(path).manifest
    assert manifest.to_dict() == on_disk
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_a_manifest_written_is_the_manifest_read(untrained_bundle: Path,
                                                 tmp_path: Path) -> None:
    """write_bundle takes a typed manifest and computes the checksums; what the node
    reads back is that manifest, with them."""
    source = Bundle.load(untrained_bundle)
    manifest = replace(source.manifest, name="copy", backends=("onnxruntime",),
                       preprocessing=Preprocessing.of(EXPOSED_FIELD), files={})
    written = write_bundle(tmp_path / "copy", manifest,
                           {CLASSIFIER_FILE: source.file(CLASSIFIER_FILE)})
    assert written.manifest == replace(manifest, files={
        CLASSIFIER_FILE: source.manifest.files[CLASSIFIER_FILE]})


def test_the_crops_are_recorded_only_where_they_say_something() -> None:
    assert Preprocessing.of(NO_CROP) is None and Preprocessing.of(NO_CROP, NO_CROP) is None
    assert Preprocessing.of(EXPOSED_FIELD, EXPOSED_FIELD) == Preprocessing(EXPOSED_FIELD)
    assert Preprocessing.of(NO_CROP, EXPOSED_FIELD) == Preprocessing(NO_CROP, EXPOSED_FIELD)
