"""`data inspect` on a tiny dataset: every number is known, every plot is a real PNG."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydicom.uid import generate_uid

from fractured.engine.preprocess import DecodeError
from fractured.training.datasets.base import BoxLabel, Sample, SampleSet
from fractured.training.inspect import SUMMARY_NAME, image_size, inspect_dataset
from tests import factory

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def picture(seed: int, height: int, width: int) -> np.ndarray:
    """Smooth random structure: distinct seeds give distinct hashes."""
    noise = np.random.default_rng(seed).random((height, width)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), max(height, width) / 12)
    return (255 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SampleSet:
    """Six images: a.png and its mirror e.png (a duplicate pair with opposite labels), a
    DICOM, a JPEG, an unreadable file, and one image whose boxes are unknown."""
    root = tmp_path_factory.mktemp("tiny")
    cv2.imwrite(str(root / "a.png"), picture(0, 100, 80))
    cv2.imwrite(str(root / "e.png"), picture(0, 100, 80)[:, ::-1])
    cv2.imwrite(str(root / "b.png"), picture(1, 60, 120))
    cv2.imwrite(str(root / "c.jpg"), picture(2, 100, 80))
    factory.xray(generate_uid(), rows=300, cols=240).save_as(root / "d.dcm",
                                                             enforce_file_format=True)
    (root / "broken.png").write_bytes(b"not an image at all")
    samples = (
        Sample(root / "a.png", 1, "hand", split="train",
               boxes=(BoxLabel(0.1, 0.2, 0.3, 0.6), BoxLabel(0.5, 0.5, 0.9, 0.7))),
        Sample(root / "b.png", 1, "leg", split="test", boxes=(BoxLabel(0.0, 0.0, 0.5, 0.5),)),
        Sample(root / "c.jpg", 0, "hand", split="train", boxes=()),
        Sample(root / "d.dcm", 0, "", split="val", boxes=()),
        Sample(root / "e.png", 0, "hand", split="train", boxes=None),
        Sample(root / "broken.png", 0, "leg", split="train", boxes=()),
    )
    return SampleSet("test", root, samples)


@pytest.fixture(scope="module")
def inspection(tiny: SampleSet, tmp_path_factory: pytest.TempPathFactory):
    return inspect_dataset(tiny, tmp_path_factory.mktemp("report"), workers=2)


def test_counts(inspection) -> None:
    summary = inspection.summary
    assert summary["images"] == 6
    assert summary["labels"] == {"0": 4, "1": 2}
    assert summary["body_part_label"] == {"hand": {"0": 2, "1": 1}, "leg": {"0": 1, "1": 1},
                                          "unknown": {"0": 1, "1": 0}}
    assert summary["shipped_split"] == {"train": 4, "val": 1, "test": 1, "none": 0}


def test_image_sizes_from_headers(inspection) -> None:
    sizes = inspection.summary["image_size"]
    # a, e, c: 80x100; b: 120x60; d (DICOM): 240x300; broken: none
    assert sizes["width"] == {"count": 5, "min": 80, "median": 80, "mean": 120, "max": 240}
    assert sizes["height"]["min"] == 60 and sizes["height"]["max"] == 300
    assert sizes["most_common"][0] == ["80x100", 3]


def test_box_statistics(inspection) -> None:
    boxes = inspection.summary["boxes"]
    assert boxes["images_with_box_labels"] == 5 and boxes["images_without_box_labels"] == 1
    assert boxes["boxes"] == 3
    assert boxes["per_image"] == {"0": 3, "1": 1, "2": 1}
    assert boxes["per_image_by_label"]["1"]["mean"] == 1.5
    assert boxes["width"] == {"count": 3, "min": 0.2, "median": 0.4, "mean": 0.3667,
                              "max": 0.5}
    assert boxes["area"]["max"] == 0.25 and boxes["area"]["min"] == 0.08
    # aspect in pixels: a.png is 80 wide, 100 high: 0.2*80 / (0.4*100), 0.4*80 / (0.2*100);
    # b.png 120 x 60: 0.5*120 / (0.5*60)
    assert boxes["aspect"]["min"] == 0.4 and boxes["aspect"]["max"] == 2.0
    assert boxes["aspect"]["median"] == 1.6


def test_duplicates_and_unreadable_files(inspection) -> None:
    found = inspection.summary["duplicates"]
    assert found["groups"] == 1 and found["images"] == 2 and found["largest"] == 2
    assert found["members"] == [["a.png", "e.png"]]
    assert found["conflicting_labels"] == 1
    unreadable = inspection.summary["unreadable"]
    assert [item["path"] for item in unreadable] == ["broken.png"]
    assert "broken.png" in unreadable[0]["error"]


def test_summary_json_matches(inspection) -> None:
    written = json.loads(inspection.files[0].read_text())
    assert inspection.files[0].name == SUMMARY_NAME
    assert written == inspection.summary


def test_plots_are_valid_pngs(inspection) -> None:
    names = sorted(path.name for path in inspection.files[1:])
    assert names == ["box_centres.png", "box_sizes.png", "boxes_per_image.png",
                     "duplicates.png", "image_sizes.png", "labels_by_body_part.png"]
    for path in inspection.files[1:]:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = cv2.imread(str(path))
        assert image is not None
        if path.name != "duplicates.png":
            assert image.shape[:2] == (400, 600), path.name


def test_table(inspection) -> None:
    text = inspection.table()
    assert "test dataset at" in text and ": 6 images" in text
    assert "hand             2        1      3" in text
    assert "shipped split: train 4, val 1, test 1, none 0" in text
    assert "boxes: 3 on 5 images with box labels (1 without)" in text
    assert "1 groups, 2 images, largest 2, 1 with conflicting labels" in text
    assert "unreadable: 1 files" in text


def test_without_duplicates_or_boxes(tiny: SampleSet, tmp_path: Path) -> None:
    """No hashing asked, no boxes known: no duplicate section, no box plots."""
    readable = SampleSet("test", tiny.root, tuple(
        Sample(s.path, s.label, s.body_part) for s in tiny.samples[:4]))
    inspection = inspect_dataset(readable, tmp_path, duplicates=False)
    assert "duplicates" not in inspection.summary
    assert inspection.summary["boxes"]["boxes"] == 0
    assert sorted(path.name for path in inspection.files) == [
        "image_sizes.png", "labels_by_body_part.png", "summary.json"]
    assert "near-duplicates" not in inspection.table()


def test_image_size_names_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(DecodeError, match=r"x\.dcm"):
        image_size(path)
