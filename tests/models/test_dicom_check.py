"""The DICOM check: each variant written as modalities store it must read back, through
the node's own reader, as the image it was made from (or that image inside its bands)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from fractured.cli import main
from fractured.engine.bundle import Bundle
from fractured.engine.exposed_field import exposed_field
from fractured.engine.pipeline import Pipeline
from fractured.engine.sources import load_image
from fractured.training.datasets.base import Sample
from fractured.training.dicom_check import (
    BAND_SIDES,
    BAND_TOP,
    VARIANTS,
    as_dataset,
    check_dicom,
    report_markdown,
)


def _radiograph(seed: int = 0, shape: tuple[int, int] = (180, 140)) -> np.ndarray:
    """An 8-bit export's grey levels: smooth structure over the whole frame."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), 4)
    image = (image - image.min()) / (image.max() - image.min())
    return np.round(image * 255) / 255


def _read_back(tmp_path: Path, image: np.ndarray, variant: str) -> np.ndarray:
    path = tmp_path / f"{variant}.dcm"
    as_dataset(image, variant).save_as(path, enforce_file_format=True)
    return load_image(path).pixels


@pytest.mark.parametrize("variant", ["windowed", "monochrome1"])
def test_a_windowed_variant_reads_back_as_its_export(tmp_path: Path, variant: str) -> None:
    image = _radiograph()
    shown = _read_back(tmp_path, image, variant)
    assert shown.shape == image.shape
    # the dither stays within each 8-bit step: the same grey levels come back
    assert np.max(np.abs(shown - image)) <= 0.5 / 255 + 1e-3


def test_without_a_window_the_reader_stretches_the_range_as_a_viewer_does(
        tmp_path: Path) -> None:
    image = _radiograph(1)
    shown = _read_back(tmp_path, image, "full_range")
    assert np.corrcoef(shown.ravel(), image.ravel())[0, 1] > 0.99  # same picture ...
    assert np.max(np.abs(shown - image)) > 2 / 255  # ... with the viewer's contrast


def test_the_collimated_variant_adds_bands_the_exposed_field_finds(tmp_path: Path) -> None:
    image = _radiograph(2)
    shown = _read_back(tmp_path, image, "collimated")
    side, top = round(image.shape[1] * BAND_SIDES), round(image.shape[0] * BAND_TOP)
    assert shown.shape == (image.shape[0] + top, image.shape[1] + 2 * side)
    assert np.max(np.abs(shown[top:, side:-side] - image)) <= 1.5 / 255  # + detector noise
    assert shown[:top].mean() > 0.99 and shown[:, :side].mean() > 0.99
    field = exposed_field(shown)
    assert abs(field.top - top) <= 2 and abs(field.left - side) <= 2
    assert abs(field.right - (side + image.shape[1])) <= 2


def test_an_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown DICOM variant 'jpeg2000'"):
        as_dataset(_radiograph(), "jpeg2000")


@pytest.mark.slow
def test_a_bundle_says_the_same_of_a_windowed_dicom_as_of_its_export(
        tmp_path: Path, untrained_bundle: Path) -> None:
    samples = []
    for index in range(6):
        path = tmp_path / f"export{index}.png"
        cv2.imwrite(str(path), np.round(_radiograph(index) * 255).astype(np.uint8))
        samples.append(Sample(path=path, label=index % 2))
    pipeline = Pipeline(Bundle.load(untrained_bundle), backend="onnxruntime")
    result = check_dicom(pipeline, samples)
    rows = {row["variant"]: row for row in result["variants"]}
    assert result["images"] == 6 and set(rows) == set(VARIANTS)
    for variant in ("windowed", "monochrome1"):
        assert rows[variant]["max_abs_change"] < 0.01, rows[variant]
    # the bands change what a bundle without a crop sees
    assert rows["collimated"]["mean_abs_change"] > rows["windowed"]["mean_abs_change"]
    assert "| windowed |" in report_markdown(result, bundle="t", part="val")


@pytest.mark.slow
def test_the_cli_checks_a_bundle_on_its_split_and_writes_the_report(
        tmp_path: Path, scored_bundle: tuple[Path, Path, Path]) -> None:
    _, split, bundle = scored_bundle
    out = tmp_path / "check"
    result = CliRunner().invoke(main, ["check-dicom", str(bundle), "--split", str(split),
                                       "--part", "val", "--limit", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "dicom-check.json").read_text())
    assert report["images"] == 3
    assert [row["variant"] for row in report["variants"]] == list(VARIANTS)
    assert "## DICOM check" in (out / "dicom-check.md").read_text()
    refused = CliRunner().invoke(main, ["check-dicom", str(bundle), "--split", str(tmp_path),
                                        "--out", str(tmp_path / "other")])
    assert refused.exit_code != 0 and "no split written here" in refused.output
