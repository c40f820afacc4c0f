"""`fractured predict`: files in, one result per file in input order, errors in place.

Runs the real pipeline on untrained bundles, so the numbers mean nothing; what is checked
is the plumbing: order, the JSON shape, error reporting, exit status, overlays, the
UNTRAINED warning kept off the JSON stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner, Result

from fractured.cli import main
from fractured.results.overlay import BOX_COLOUR
from tests.factory import phantom, write_study

UNTRAINED_LINE = "UNTRAINED MODEL: these results mean nothing"
READABLE_KEYS = {"file", "probability", "spread", "level", "decisions", "operating_points",
                 "scope", "boxes", "model"}


def png(path: Path, rows: int = 200, cols: int = 160, seed: int = 0) -> Path:
    """An 8-bit PNG of the phantom (bone band bright), as a user would export one."""
    pixels = phantom(rows, cols, seed).astype(np.float32) / 4000 * 255
    assert cv2.imwrite(str(path), pixels.astype(np.uint8))
    return path


def broken(path: Path) -> Path:
    """A file that claims to be DICOM and is not one."""
    path.write_bytes(b"\0" * 128 + b"DICM" + b"not a data set")
    return path


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A PNG, a broken file and a DICOM image (300 x 240), in that order."""
    (dicom,) = write_study(tmp_path / "study", 1)
    return png(tmp_path / "hand.png"), broken(tmp_path / "broken.dcm"), dicom


def run(bundle: Path, *args: str | Path) -> Result:
    return CliRunner().invoke(main, ["predict", "--bundle", str(bundle), *map(str, args)])


def json_lines(result: Result) -> list[dict]:
    """stdout as JSON lines: every line must be one object (nothing else on stdout)."""
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_json_lines_in_input_order_with_an_error_in_place(
        untrained_bundle: Path, inputs: tuple[Path, Path, Path]) -> None:
    result = run(untrained_bundle, *inputs, "--json")
    assert result.exit_code == 1, result.output
    objects = json_lines(result)
    assert [o["file"] for o in objects] == [str(path) for path in inputs]
    first, bad, last = objects
    assert set(bad) == {"file", "error"} and str(inputs[1]) in bad["error"]
    for good in (first, last):
        assert set(good) == READABLE_KEYS
        assert 0.0 <= good["probability"] <= 1.0 and good["spread"] is None
        assert good["level"] in ("negative", "possible", "likely")
        assert good["decisions"] == {"high_sensitivity": good["level"] != "negative",
                                     "high_specificity": good["level"] == "likely"}
        assert good["boxes"] == []  # this bundle has no detector
        assert good["model"] == {"name": "fractured-untrained", "version": "0.0.0",
                                 "trained": False}
    assert UNTRAINED_LINE in result.stderr and UNTRAINED_LINE not in result.stdout
    assert "1 of 3 files could not be read" in result.stderr


def test_all_readable_exits_zero_and_tta_reports_a_spread(
        untrained_bundle: Path, inputs: tuple[Path, Path, Path]) -> None:
    png_file, _, dicom = inputs
    result = run(untrained_bundle, dicom, png_file, "--json", "--tta")
    assert result.exit_code == 0, result.output
    objects = json_lines(result)
    assert [o["file"] for o in objects] == [str(dicom), str(png_file)]
    assert all(o["spread"] >= 0.0 for o in objects)


def test_order_is_kept_across_batches(untrained_bundle: Path, tmp_path: Path) -> None:
    """More readable files than one batch (8), with errors at both ends and between."""
    paths = [tmp_path / "missing-first.png"]
    paths += [png(tmp_path / f"p{i}.png", seed=i) for i in range(5)]
    paths += [broken(tmp_path / "bad.dcm")]
    paths += [png(tmp_path / f"q{i}.png", seed=10 + i) for i in range(6)]
    paths += [tmp_path / "missing-last.png"]
    result = run(untrained_bundle, *paths, "--json")
    assert result.exit_code == 1
    objects = json_lines(result)
    assert [o["file"] for o in objects] == [str(path) for path in paths]
    assert ["error" in o for o in objects] == [
        path.name in ("missing-first.png", "bad.dcm", "missing-last.png") for path in paths]
    assert "no such file" in objects[0]["error"]


def test_a_special_file_is_reported_in_place(
        untrained_bundle: Path, inputs: tuple[Path, Path, Path]) -> None:
    """A file that is not what it seems (/proc/self/mem: a regular file to stat, no
    data to read) is one more unreadable file, named, not the end of the run."""
    refusing = Path("/proc/self/mem")
    if not refusing.exists():
        pytest.skip("needs Linux /proc/self/mem")
    _, _, dicom = inputs
    result = run(untrained_bundle, refusing, dicom, "--json")
    assert result.exit_code == 1
    refused, good = json_lines(result)
    assert refused["file"] == str(refusing) and str(refusing) in refused["error"]
    assert good["file"] == str(dicom) and "probability" in good


def test_overlay_writes_one_png_per_readable_file(
        untrained_bundle: Path, inputs: tuple[Path, Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "overlays" / "new"  # created, parents too
    result = run(untrained_bundle, *inputs, "--overlay", out)
    assert result.exit_code == 1
    assert sorted(path.name for path in out.iterdir()) == ["hand.png", "img1.png"]
    for name, (rows, cols) in (("hand.png", (200, 160)), ("img1.png", (300, 240))):
        image = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert image.ndim == 3 and image.shape[1] == cols  # small: never enlarged
        banner_rows = image.shape[0] - rows
        assert banner_rows > 40, "no banner above the image"
        banner = image[:banner_rows]
        assert (banner.max(axis=2) < 60).mean() > 0.5  # black strip with text
        # Written as RGB sees it: the UNTRAINED band is red, (200, 0, 0) in RGB.
        red = (banner[..., 2] > 150) & (banner[..., 1] < 60) & (banner[..., 0] < 60)
        assert red.mean() > 0.1


def test_overlay_refuses_to_lose_an_image(untrained_bundle: Path, tmp_path: Path) -> None:
    """Two inputs with one stem would write one overlay; an overlay beside its PNG input
    would replace it. Both are refused before anything runs."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = png(tmp_path / "a" / "x.png"), png(tmp_path / "b" / "x.png")
    result = run(untrained_bundle, first, second, "--overlay", tmp_path / "out")
    assert result.exit_code == 2
    assert str(first) in result.output and str(second) in result.output
    assert not (tmp_path / "out").exists()

    before = first.read_bytes()
    result = run(untrained_bundle, first, "--overlay", tmp_path / "a")
    assert result.exit_code == 2 and "would overwrite the input" in result.output
    assert first.read_bytes() == before


def test_table_has_a_row_per_file(untrained_bundle: Path,
                                  inputs: tuple[Path, Path, Path]) -> None:
    result = run(untrained_bundle, *inputs)
    assert result.exit_code == 1
    header, *rows = result.stdout.splitlines()
    assert header.split()[:3] == ["file", "probability", "level"]
    assert len(rows) == 3
    for row, path in zip(rows, inputs, strict=True):
        assert row.startswith(str(path))
    assert "error:" in rows[1] and "error:" not in rows[0] + rows[2]
    cells = rows[0][len(str(inputs[0])):].split()
    assert cells[1] in ("negative", "possible", "likely")
    assert cells[2] in ("yes", "no") and cells[3] in ("yes", "no")
    assert cells[4:] == ["0", "-"]  # no boxes, no best score
    assert UNTRAINED_LINE in result.stderr


def test_bundle_from_the_config(untrained_bundle: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nbundle = "{untrained_bundle}"\n')
    result = CliRunner().invoke(main, ["predict", "--config", str(config), "--json",
                                       str(png(tmp_path / "x.png"))])
    assert result.exit_code == 0, result.output
    (only,) = json_lines(result)
    assert only["model"]["name"] == "fractured-untrained"


def test_missing_bundle_is_named(tmp_path: Path) -> None:
    result = run(tmp_path / "no-such-bundle", png(tmp_path / "x.png"))
    assert result.exit_code == 1
    assert "cannot load engine bundle" in result.output and "no-such-bundle" in result.output


@pytest.mark.slow  # builds the detector bundle (~30 s)
def test_boxes_reach_the_json_and_the_overlay(untrained_bundle_with_detector: Path,
                                              tmp_path: Path) -> None:
    """The random detector scores every box about the same (~0.5): whatever it returns
    must come out in source pixels and be drawn, with the legend."""
    image = png(tmp_path / "x.png", rows=400, cols=320)
    result = run(untrained_bundle_with_detector, image, "--json", "--boxes", "always",
                 "--overlay", tmp_path / "out")
    assert result.exit_code == 0, result.output
    (only,) = json_lines(result)
    boxes = only["boxes"]
    assert boxes, "the untrained detector found nothing to check with"
    for box in boxes:
        assert set(box) == {"x0", "y0", "x1", "y1", "score", "level"}
        assert 0 <= box["x0"] < box["x1"] <= 320 and 0 <= box["y0"] < box["y1"] <= 400
        assert box["level"] in ("possible", "likely")
    overlay = cv2.imread(str(tmp_path / "out" / "x.png"))[..., ::-1]  # as RGB
    banner, xray = overlay[:-400], overlay[-400:]
    assert np.all(xray == BOX_COLOUR, axis=2).any(), "no box drawn"
    legend = (banner[..., 0] > 180) & (banner[..., 1] < 80) & (banner[..., 2] > 180)
    assert legend.any(), "no legend in the banner"
