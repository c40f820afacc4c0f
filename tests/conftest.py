"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fractured.training.build import build_untrained_bundle
from tests.postgres import PostgresCluster, server_bin


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight engine bundle at 128 px (built once: ~1 s), for pipeline tests.

    Tests must not modify it; copy it to tamper with it.
    """
    return build_untrained_bundle(
        tmp_path_factory.mktemp("engines") / "fractured-untrained-0.0.0", input_size=128)


#: The detector in `untrained_bundle_with_detector`: small, to keep the suite fast.
DETECTOR_SIZE = 256


@pytest.fixture(scope="session")
def untrained_bundle_with_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight bundle with a MobileNetV3-FPN detector at 256 px (built once:
    ~25 s, mostly the detector's ONNX export). Tests must not modify it."""
    return build_untrained_bundle(
        tmp_path_factory.mktemp("engines") / "fractured-untrained-det-0.0.0",
        input_size=128, detector="mobilenet_v3_large_fpn", detector_input_size=DETECTOR_SIZE)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of the session's own (tests.postgres), stopped at its end;
    skips, saying why, where the server is not installed."""
    cluster = PostgresCluster(server_bin()).start()
    try:
        yield cluster
    finally:
        cluster.stop()
