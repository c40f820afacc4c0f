"""The listener's own File Meta Information encoding equals pydicom's, byte for byte."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, RLELossless
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from fractured.daemon.file_meta import file_header


@pytest.mark.parametrize(("sop_class", "syntax", "sending", "receiving"), [
    ("1.2.840.10008.5.1.4.1.1.1", ExplicitVRLittleEndian, "STORESCU", "FRACTURED"),
    ("1.2.840.10008.5.1.4.1.1.1.1", JPEG2000, "ODD", "NODE1"),  # odd lengths: padded
    ("1.2.840.10008.5.1.4.1.1.1.1.1", RLELossless, "", ""),  # no AE titles at all
    ("1.2.840.10008.5.1.4.1.1.7", ExplicitVRLittleEndian, "SIXTEEN_CHARS_AE", "A"),
])
def test_header_equals_pydicoms_encoding(sop_class: str, syntax: str, sending: str,
                                         receiving: str) -> None:
    for instance in (pydicom.uid.generate_uid(), "1.2.3", "1.2.34"):  # odd and even
        meta = create_file_meta(sop_class_uid=sop_class, sop_instance_uid=instance,
                                transfer_syntax=syntax)
        if sending:
            meta.SendingApplicationEntityTitle = sending
        if receiving:
            meta.ReceivingApplicationEntityTitle = receiving
        expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        assert file_header(sop_class, instance, syntax, sending, receiving) == expected


def test_header_reads_back() -> None:
    header = file_header("1.2.840.10008.5.1.4.1.1.1", "1.2.3.4", ExplicitVRLittleEndian,
                         "MOD", "FRACTURED")
    ds = pydicom.dcmread(BytesIO(header))  # a file with an empty dataset
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.SendingApplicationEntityTitle == "MOD"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
