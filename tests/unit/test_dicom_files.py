"""Deflated DICOM read with a ceiling (fractured.dicom_files): what a read needs is
inflated, never the bomb; pydicom's own read of the same file is the peer."""

from __future__ import annotations

import tracemalloc
import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from fractured import dicom_files
from fractured.engine.preprocess import ImageTooLarge, display_pixels, read_dataset
from tests import bombs, factory

MIB = 1 << 20


def peak_mib(read: Callable[[], Any]) -> float:
    """The most memory Python allocated while `read` ran, in MiB."""
    tracemalloc.start()
    try:
        read()
    except Exception:  # what was allocated before the refusal is what counts
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / MIB


def test_a_deflated_file_reads_as_pydicom_reads_it(tmp_path: Path) -> None:
    ds = factory.xray(generate_uid())
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    theirs = pydicom.dcmread(path, stop_before_pixels=True)
    ours = dicom_files.read_header(path)
    assert [(e.tag, e.value) for e in ours] == [(e.tag, e.value) for e in theirs]
    assert ours.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    whole = read_dataset(path)
    assert (display_pixels(whole) == display_pixels(pydicom.dcmread(path))).all()


def test_the_header_of_a_pixel_bomb_is_read_without_inflating_the_pixels(
        tmp_path: Path) -> None:
    path = bombs.deflate_bomb(tmp_path / "bomb.dcm", generate_uid(), zeros_mib=100)
    assert path.stat().st_size < MIB  # 100 MiB of zeros in ~100 kB
    header = dicom_files.read_header(path)
    assert (header.Rows, header.Modality) == (10000, "DX")
    ours = peak_mib(lambda: dicom_files.read_header(path))
    theirs = peak_mib(lambda: pydicom.dcmread(path, stop_before_pixels=True))
    print(f"header of a 100 MiB deflate bomb: {ours:.1f} MiB here, {theirs:.0f} MiB "
          f"by pydicom ({theirs / ours:.0f}x)")
    assert theirs >= 100 and ours < 8


def test_a_bomb_before_the_header_ends_is_refused_at_the_limit(tmp_path: Path) -> None:
    path = bombs.deflate_bomb(tmp_path / "bomb.dcm", generate_uid(), zeros_mib=64,
                              before_identity=True)
    with pytest.raises(dicom_files.InflateLimitExceeded, match="more than 16 MiB before"):
        dicom_files.read_header(path)
    assert peak_mib(lambda: dicom_files.read_header(path)) < 4 * 16


def test_a_whole_read_counts_the_inflated_size_before_inflating(tmp_path: Path) -> None:
    path = bombs.deflate_bomb(tmp_path / "bomb.dcm", generate_uid(), zeros_mib=100)
    with pytest.raises(ImageTooLarge, match="inflates to more than 18 MiB"):
        read_dataset(path, max_megapixels=0.75)  # 3 MB of pixels and a 16 MiB header
    assert peak_mib(lambda: read_dataset(path, max_megapixels=0.75)) < 4


def test_inflated_size_is_exact_below_the_limit() -> None:
    data = bytes(range(256)) * 40000
    deflater = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    packed = deflater.compress(data) + deflater.flush()
    assert dicom_files.inflated_size(BytesIO(packed), len(data)) == len(data)
    with pytest.raises(dicom_files.InflateLimitExceeded):
        dicom_files.inflated_size(BytesIO(packed), len(data) - 1)


def test_an_rle_bomb_is_refused_from_its_header_before_decoding(tmp_path: Path) -> None:
    path = bombs.rle_bomb(tmp_path / "rle.dcm", generate_uid())
    assert path.stat().st_size < 7 * MIB  # 400 megapixels
    ds = read_dataset(path)
    with pytest.raises(ImageTooLarge, match=r"20000 x 20000 pixels \(400 megapixels\)"):
        display_pixels(ds)
    assert peak_mib(lambda: display_pixels(ds)) < 1
    small = bombs.rle_bomb(tmp_path / "small.dcm", generate_uid(), rows=300, cols=200)
    assert display_pixels(read_dataset(small)).shape == (300, 200)  # the bomb is valid RLE
