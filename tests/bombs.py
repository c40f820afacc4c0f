"""Memory bombs for the bad-input corpus: small files that decode to gigabytes.

- `deflate_bomb`: Deflated Explicit VR Little Endian whose zeros compress about 1000:1,
  either in the pixel data (after the elements the listener reads) or in a private
  element before them;
- `rle_bomb`: RLE Lossless of 20000 x 20000 8-bit pixels, 6.3 MB on the wire and
  400 MB decoded (and about 25 bytes a pixel at the decoder's peak).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO, DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from tests import factory

MIB = 1 << 20


def _explicit_le(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return out.getvalue()


def _element_header(group: int, element: int, vr: bytes, length: int) -> bytes:
    """An explicit VR little endian header of an OB/OW element."""
    return struct.pack("<HH2sHI", group, element, vr, 0, length)


def deflate_bomb(path: Path, study_uid: str, *, zeros_mib: int = 400,
                 before_identity: bool = False) -> Path:
    """A DX image deflated, with `zeros_mib` MiB of zeros in its pixel data, or, with
    `before_identity`, in a private OB element before the patient and study elements
    (its pixel data then a small valid image)."""
    ds = factory.xray(study_uid, rows=64, cols=64)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    pixels = ds.PixelData
    del ds.PixelData
    if not before_identity:
        ds.Rows = ds.Columns = 10000  # what the zeros would be
    head = Dataset()
    tail = Dataset()
    for element in ds:
        (head if element.tag < 0x00090000 else tail).add(element)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = bytearray(deflater.compress(_explicit_le(head)))

    def zeros(group: int, element: int, vr: bytes) -> None:
        body.extend(deflater.compress(_element_header(group, element, vr, zeros_mib * MIB)))
        block = bytes(MIB)
        for _ in range(zeros_mib):
            body.extend(deflater.compress(block))

    if before_identity:
        creator = Dataset()
        creator.add_new(0x00090010, "LO", "FRACTURED TEST")
        body.extend(deflater.compress(_explicit_le(creator)))
        zeros(0x0009, 0x1000, b"OB")
        body.extend(deflater.compress(_explicit_le(tail)))
        body.extend(deflater.compress(_element_header(0x7FE0, 0x0010, b"OW", len(pixels))
                                      + pixels))
    else:
        body.extend(deflater.compress(_explicit_le(tail)))
        zeros(0x7FE0, 0x0010, b"OW")
    body.extend(deflater.flush())
    with path.open("wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), ds.file_meta)
        f.write(body)
    return path


def rle_bomb(path: Path, study_uid: str, rows: int = 20000, cols: int = 20000) -> Path:
    """An 8-bit RLE Lossless image of `rows` x `cols` zeros: each row is runs of 128
    (two bytes each, PS3.5 G.3.1), so the file is about rows x cols / 64 bytes."""
    ds = factory.xray(study_uid, rows=64, cols=64)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    full, rest = divmod(cols, 128)
    row = b"\x81\x00" * full + (bytes([257 - rest, 0]) if rest else b"")
    segment = row * rows
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    frame = header + segment
    ds.PixelData = encapsulate([frame + (b"\0" if len(frame) % 2 else b"")])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path
