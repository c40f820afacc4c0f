"""Input files of every kind `fractured predict` accepts, and the errors for the rest."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import load_image
from tests import factory


def gradient(rows: int = 60, cols: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0.0, 1.0, cols, dtype=np.float32), (rows, 1))


def test_png_8_and_16_bit_keep_their_grey_scale(tmp_path: Path) -> None:
    for dtype in (np.uint8, np.uint16):
        top = np.iinfo(dtype).max
        path = tmp_path / f"g{top}.png"
        cv2.imwrite(str(path), (gradient() * top).astype(dtype))
        image = load_image(path)
        assert image.pixels.dtype == np.float32 and image.pixels.shape == (60, 80)
        assert np.allclose(image.pixels, gradient(), atol=1.5 / 255)
        assert image.dataset is None and image.ref.sop_instance_uid == ""


def test_colour_jpeg_becomes_grey(tmp_path: Path) -> None:
    path = tmp_path / "c.jpg"
    grey = (gradient() * 255).astype(np.uint8)
    cv2.imwrite(str(path), cv2.merge([grey, grey, grey]), [cv2.IMWRITE_JPEG_QUALITY, 95])
    image = load_image(path)
    assert image.pixels.ndim == 2
    assert np.abs(image.pixels - gradient()).mean() < 0.02


def test_dicom_is_recognised_by_content_not_name(tmp_path: Path) -> None:
    (ds,) = factory.dx_study(1)
    path = tmp_path / "xray.img"  # no .dcm suffix
    ds.save_as(path, enforce_file_format=True)
    image = load_image(path)
    assert image.dataset is not None
    assert image.ref.sop_instance_uid == str(ds.SOPInstanceUID)
    assert image.pixels.shape == (ds.Rows, ds.Columns)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "not a readable DICOM, PNG or JPEG"),
    (b"hello, not an image" * 10, "not a readable DICOM, PNG or JPEG"),
])
def test_unreadable_files_name_themselves(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "junk.png"
    path.write_bytes(content)
    with pytest.raises(DecodeError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_is_named_as_such(tmp_path: Path) -> None:
    picture = (np.arange(64 * 48, dtype=np.uint32) % 251).astype(np.uint8).reshape(64, 48)
    ok, encoded = cv2.imencode(".jpg", picture)
    assert ok
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(encoded.tobytes())
    assert load_image(whole).pixels.shape == (64, 48)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(encoded.tobytes()[: len(encoded) // 2])
    with pytest.raises(DecodeError, match="a truncated JPEG") as info:
        load_image(cut)
    assert str(cut) in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="no such file"):
        load_image(tmp_path / "nope.dcm")


def test_dicom_with_broken_pixel_stream_names_the_file(tmp_path: Path) -> None:
    (ds,) = factory.dx_study(1)
    ds.PixelData = ds.PixelData[:100]
    path = tmp_path / "broken.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DecodeError, match="cannot decode pixel data") as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg2000_stream_names_the_file_and_the_syntax(tmp_path: Path) -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(pydicom_data.get_testdata_file("RG3_J2KR.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    path = tmp_path / "truncated_j2k.dcm"
    ds.save_as(path)
    with pytest.raises(DecodeError, match="JPEG 2000") as info:
        load_image(path)
    assert str(path) in str(info.value) and "cannot decode pixel data" in str(info.value)
