"""Reading received DICOM with a ceiling on what a deflated object inflates to.

Deflated Explicit VR Little Endian compresses about 1000:1 on a crafted object: 408 kB
on the wire took a process from 133 to 933 MiB when pydicom inflated it whole, as it
does for any read, even of the header alone. Here a deflated dataset is inflated only
as far as a read needs (the identity elements, the header) and never beyond a stated
number of bytes; a whole read first counts the inflated size in bounded memory. Other
transfer syntaxes are read as pydicom reads them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

#: Bytes inflated (or read) at a time.
CHUNK = 1 << 20
#: The most a header (every element before the pixel data) may inflate to: real headers
#: are kilobytes; icons and private blocks stay well under this.
HEADER_LIMIT = 16 << 20
#: The first inflated prefix a partial read tries; it grows fourfold up to its limit.
FIRST_PREFIX = 64 << 10

PIXEL_DATA = Tag(0x7FE0, 0x0010)

StopWhen = Callable[[BaseTag, str | None, int], bool]


class InflateLimitExceeded(ValueError):
    """A deflated dataset inflates to more than the reader allows."""


def _inflate(stream: BinaryIO, into: bytearray, up_to: int,
             inflater: zlib._Decompress) -> bool:
    """Inflate from `stream` into `into` until it holds `up_to` bytes; True at the end
    of the deflated data."""
    while len(into) < up_to:
        chunk = inflater.unconsumed_tail or stream.read(CHUNK)
        if not chunk:
            into += inflater.flush()
            return True
        into += inflater.decompress(chunk, up_to - len(into))
        if inflater.eof:
            return True
    return False


def read_deflated_until(stream: BinaryIO, stop_when: StopWhen, limit: int) -> Dataset:
    """The elements of the deflated dataset at `stream`'s position, up to the first for
    which `stop_when` is true, inflating no more than `limit` bytes.

    A prefix is inflated and read; while the read neither reached the stop nor the end
    of the data, a prefix four times longer is tried. InflateLimitExceeded when the stop
    lies beyond `limit` inflated bytes.
    """
    inflated, inflater = bytearray(), zlib.decompressobj(-zlib.MAX_WBITS)
    size, complete = min(FIRST_PREFIX, limit), False
    stopped: list[bool] = []

    def stop(tag: BaseTag, vr: str | None, length: int) -> bool:
        if stop_when(tag, vr, length):
            stopped.append(True)
            return True
        return False

    while True:
        complete = complete or _inflate(stream, inflated, size, inflater)
        stopped.clear()
        try:
            ds = read_dataset(BytesIO(bytes(inflated)), False, True, stop_when=stop)
        except Exception:
            if complete:
                raise
        else:
            if stopped or complete:
                return ds
        if size >= limit:
            raise InflateLimitExceeded(
                f"the deflated dataset inflates to more than {limit >> 20} MiB before its "
                "header ends")
        size = min(size * 4, limit)


def inflated_size(stream: BinaryIO, limit: int) -> int:
    """Bytes the deflated data at `stream`'s position inflates to, counted CHUNK by
    CHUNK; InflateLimitExceeded as soon as it passes `limit`."""
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while chunk := inflater.unconsumed_tail or stream.read(CHUNK):
        total += len(inflater.decompress(chunk, CHUNK))
        if total > limit:
            raise InflateLimitExceeded(f"the deflated dataset inflates to more than "
                                       f"{limit >> 20} MiB")
        if inflater.eof:
            break
    return total + len(inflater.flush())


def _deflated_start(path: Path) -> int | None:
    """Where the dataset of a deflated file begins, or None for another syntax."""
    meta = read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    with path.open("rb") as f:
        f.seek(128)
        preamble = 132 if f.read(4) == b"DICM" else 0
    # the group length element (12 bytes explicit VR) and the group it measures
    return preamble + 12 + int(meta.FileMetaInformationGroupLength)


def read_header(path: str | Path) -> Dataset:
    """The file's elements before its pixel data, with its file meta; a deflated file is
    inflated no further than that (HEADER_LIMIT)."""
    path = Path(path)
    start = _deflated_start(path)
    if start is None:
        return pydicom.dcmread(path, stop_before_pixels=True)
    with path.open("rb") as f:
        f.seek(start)
        ds = read_deflated_until(f, lambda tag, _vr, _length: tag >= PIXEL_DATA,
                                 HEADER_LIMIT)
    ds.file_meta = read_file_meta_info(path)
    return ds


def read_file(path: str | Path, max_inflated: int) -> Dataset:
    """The whole file, as pydicom reads it; a deflated one only once its dataset was
    counted to inflate to no more than `max_inflated` bytes (InflateLimitExceeded)."""
    path = Path(path)
    start = _deflated_start(path)
    if start is not None:
        with path.open("rb") as f:
            f.seek(start)
            inflated_size(f, max_inflated)
    return pydicom.dcmread(path)
