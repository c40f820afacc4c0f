"""Fixtures shared by the test modules, and each test's tier, from its folder.

The tiers (CONTRIBUTING.md): unit (no torch, no process, no sleeping; tests/unit/conftest.py
holds it to that), models (torch: training, export, the engine), integration (real DICOM
peers, PostgreSQL, node processes), artifacts (the shipped model and its reports, through
their data) and gpu (CUDA, TensorRT; they skip without them). `pytest -m unit` or
`pytest tests/unit` runs one tier.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from fractured.engine.bundle import MANIFEST_FILE, Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.sources import load_image
from fractured.training.datasets import open_dataset
from fractured.training.splits import make_split, write_split
from tests.postgres import PostgresCluster, server_bin

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "models", "integration", "artifacts", "gpu")


@pytest.fixture(autouse=True)
def _pydicom_as_it_was() -> Iterator[None]:
    """A test that runs a command in this process (click's CliRunner) sets the node's
    logging up, which turns pydicom's value validation off and changes how warnings
    are shown (fractured.privacy): put both back, so no later test sees it."""
    from pydicom import config

    settings = config.settings
    reading, writing = settings._reading_validation_mode, settings._writing_validation_mode
    show = warnings.showwarning
    yield
    settings._reading_validation_mode, settings._writing_validation_mode = reading, writing
    warnings.showwarning = show


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier, so `-m` selects tiers as folders do."""
    for item in items:
        tier = item.path.resolve().relative_to(TESTS).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test belongs in a tier's folder "
                                    f"({', '.join(TIERS)})")
        item.add_marker(tier)


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight engine bundle at 128 px (built once: ~1 s), for pipeline tests.

    Tests must not modify it; copy it to tamper with it.
    """
    from fractured.training.build import build_untrained_bundle  # torch: only when asked

    return build_untrained_bundle(
        tmp_path_factory.mktemp("engines") / "fractured-untrained-0.0.0", input_size=128)


#: The detector in `untrained_bundle_with_detector`: small, to keep the suite fast.
DETECTOR_SIZE = 256


@pytest.fixture(scope="session")
def untrained_bundle_with_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight bundle with a MobileNetV3-FPN detector at 256 px (built once:
    ~25 s, mostly the detector's ONNX export). Tests must not modify it."""
    from fractured.training.build import build_untrained_bundle  # torch: only when asked

    return build_untrained_bundle(
        tmp_path_factory.mktemp("engines") / "fractured-untrained-det-0.0.0",
        input_size=128, detector="mobilenet_v3_large_fpn", detector_input_size=DETECTOR_SIZE)


@pytest.fixture(scope="session")
def scored_bundle(untrained_bundle_with_detector: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(data set, split folder, bundle) for `fractured fuse` and `fractured quantize`:
    a bundle with both models, marked trained on a split whose parts it records, on
    images where a fusion has something to find. Tests must not modify it.

    A model trained in seconds ranks nothing (a one-epoch smoke run's logits and box
    scores are constant), so the labels are made a rule of the random-weight bundle's
    own two numbers instead: an image is a fracture when the ranks of its logit and its
    best box score add up to more than the median. Both raise the odds, so a fit must
    weigh both positively. The bundle's manifest is marked trained on this data set's
    split, with the records build-engine writes for a run.
    """
    root = tmp_path_factory.mktemp("fusable")
    data = root / "yolo"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "classes.txt").write_text("fracture\n")
    paths = []
    for index in range(40):
        rng = np.random.default_rng(index)
        noise = cv2.GaussianBlur(rng.random((160, 128)).astype(np.float32), (0, 0),
                                 3 + index % 7)
        paths.append(data / "images" / f"img{index:03d}.png")
        cv2.imwrite(str(paths[-1]), (255 * (noise - noise.min()) / np.ptp(noise)).astype(np.uint8))
    pipeline = Pipeline(Bundle.load(untrained_bundle_with_detector), backend="onnxruntime")
    evidence = pipeline.evidence([load_image(path).pixels for path in paths])
    ranks = evidence.argsort(axis=0).argsort(axis=0).sum(axis=1)
    for path, rank in zip(paths, ranks, strict=True):
        box = "0 0.5 0.5 0.2 0.2\n" if rank > np.median(ranks) else ""
        (data / "labels" / f"{path.stem}.txt").write_text(box)
    sample_set = open_dataset(data, None)
    split_dir = root / "split"
    split = make_split(sample_set, val=0.3, test=0.3, seed=0)
    write_split(split, split_dir)
    parts = {name: split.samples(sample_set, name) for name in ("train", "val")}
    record = {"data": {"dataset": str(data), "format": sample_set.format,
                       "images": len(sample_set.samples),
                       **{f"{name}_images": len(part) for name, part in parts.items()},
                       **{f"{name}_positive": sum(s.label for s in part)
                          for name, part in parts.items()}},
              "settings": {"target_sensitivity": 0.95, "target_specificity": 0.9}}
    bundle = root / "engines" / "fractured-1.0.0"
    shutil.copytree(untrained_bundle_with_detector, bundle)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest.update(name="fractured", version="1.0.0", trained=True,
                    training={"classifier": record, "detector": record})
    (bundle / MANIFEST_FILE).write_text(json.dumps(manifest))
    return data, split_dir, bundle


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL server of the session's own (tests.postgres), stopped at its end;
    skips, saying why, where the server is not installed."""
    cluster = PostgresCluster(server_bin()).start()
    try:
        yield cluster
    finally:
        cluster.stop()
