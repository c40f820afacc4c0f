"""The manifest's one type, both ways: what `Manifest.from_dict` reads, `to_dict` writes
back as it was, for every shipped bundle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fractured.engine.bundle import MANIFEST_FILE, Bundle, Manifest

ENGINES = Path(__file__).resolve().parent.parent / "engines"
SHIPPED = sorted(path for path in ENGINES.iterdir() if (path / MANIFEST_FILE).is_file())


def test_there_are_shipped_bundles_to_check() -> None:
    assert SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[path.name for path in SHIPPED])
def test_a_shipped_manifest_is_written_back_as_it_is_on_disk(path: Path) -> None:
    on_disk = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    manifest = Bundle.load(path).manifest
    assert manifest.to_dict() == on_disk
    assert Manifest.from_dict(manifest.to_dict()) == manifest

