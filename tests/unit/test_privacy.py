"""The Redactor (fractured.privacy) replaces every identifying value of a study, and
the parts a library might quote alone, in a text about an error."""

from __future__ import annotations

from pydicom.uid import generate_uid

from fractured.privacy import REDACTED, Redactor
from tests import factory, phi


def test_every_identifying_value_and_its_parts_are_replaced() -> None:
    ds = phi.with_invalid_values(factory.xray(generate_uid()))
    redact = Redactor.of([ds])
    quoted = " | ".join(f"{keyword}: '{value}'" for keyword, value in phi.INVALID.items())
    quoted += " | Qzname" + "x" * 70 + " alone | Given? no: too common to matter"
    cleaned = redact(quoted)
    assert phi.leaks(cleaned) == []
    assert cleaned.count(REDACTED) >= len(phi.INVALID)
    assert "PatientBirthDate: '<redacted>'" in cleaned  # the attribute's name stays


def test_short_pieces_and_other_text_are_left_alone() -> None:
    ds = factory.xray(generate_uid())
    ds.PatientName, ds.PatientSex = "Li^Al", "M"
    redact = Redactor.of([ds])
    text = "DecodeError: 1.2.3.dcm: cannot decode pixel data (JPEG 2000): codestream cut"
    assert redact(text) == text
    assert redact("patient Li^Al") == f"patient {REDACTED}"


def test_no_header_redacts_nothing() -> None:
    assert Redactor.of([])("anything at all") == "anything at all"
