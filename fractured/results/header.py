"""A source image's patient and study information, made fit to copy into our results.

Result objects must carry the source's patient and study attributes exactly as the PACS
has them: that is how the PACS files them with the right patient. highdicom copies them
from a reference dataset (the SR whole modules, the SC nine attributes plus the modules
we copy; both also copy the source's equipment into Contributing Equipment). Real files
hold values that break their VR: an age of "81", a 56-character Accession Number, a
de-identification hash in a date, Cyrillic bytes with no Specific Character Set.
Copied verbatim, they make every object we write fail validation (and highdicom raises
on some of them, so the study would get no results at all). So the header we copy from
has such values emptied or removed, the least change that makes it valid, and says what
it changed (`header_repairs`) so the node can log it; valid values stay byte-identical.
"""

from __future__ import annotations

import warnings

import highdicom as hd
from pydicom import config
from pydicom.charset import convert_encodings, encode_string, python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import (
    CUSTOMIZABLE_CHARSET_VR,
    DA,
    DT,
    STR_VR,
    TM,
    PersonName,
    validate_value,
)

# highdicom warns about a person name without "^" and quotes the name in the message.
# The node logs Python warnings, and its log must never hold a patient's name: that one
# message from highdicom is ignored. A filter set once at import, because
# warnings.catch_warnings around our calls is not thread-safe.
warnings.filterwarnings(
    "ignore",
    message=r'(?s)The string ".*" is unlikely to represent the intended person name',
    category=UserWarning,
    module=r"highdicom(\.|$)",
)

_PIXEL_DATA = Tag("PixelData")
_CHARACTER_SET = Tag("SpecificCharacterSet")

# Read unconditionally by highdicom's SR and SC constructors (PS3.3 Type 2 attributes):
# made empty, the standard's "unknown", when absent or invalid, rather than removed.
_REQUIRED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# Which study, series and image the results are about: kept as they are even if
# invalid, because the PACS files the results by them and the SR references them.
_IDENTITY = frozenset(
    {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
)
# highdicom parses these into dates and times and raises when that fails, also on
# values pydicom's VR check lets through (a 31st of February, a range).
_DATES = {"DA": DA, "DT": DT, "TM": TM}
# highdicom accepts only the Enumerated Values of Patient's Sex (an old "U" raises).
_PATIENT_SEXES = frozenset({None, "", "M", "F", "O"})

_LATIN_1 = "ISO_IR 100"
# Character sets that DICOM defines, as pydicom and highdicom know them.
_CHARACTER_SETS = frozenset(python_encoding) | {
    value.value for value in hd.SpecificCharacterSetValues
}
_QUESTION_MARK = ord("?")


def study_header(source: Dataset) -> Dataset:
    """The source without its pixel data, made valid for copying into our results.

    The SR and the SC copy patient, study and equipment attributes from it, so both
    carry the same header. Every standard attribute is checked, not only those copied
    today: whatever highdicom copies is valid. What `header_repairs` lists is changed;
    an absent Type 2 attribute that highdicom reads is added empty (no value changes,
    so it is not listed). Everything else, private attributes included, is the source's
    element as it is. The source itself is not modified.
    """
    return _repair(source)[0]


def header_repairs(source: Dataset) -> list[tuple[str, str]]:
    """What `study_header` changed, as (attribute, what was done), in source order and
    the character set last.

    The attribute is a keyword, or a path into a sequence such as
    "OtherPatientIDsSequence[0].PatientID". Neither part ever holds a value from the
    source, so the list can be logged without exposing patient data.
    """
    return _repair(source)[1]


def carry_character_set(result: Dataset, header: Dataset) -> None:
    """Give `result` the header's Specific Character Set, the way the header has it.

    Results are built with ``specific_character_set=None`` and get it from here:
    highdicom would copy it itself, but raises on values DICOM defines, such as
    "\\ISO 2022 IR 87" (the usual Japanese one: its first value is empty) and Korean
    "ISO 2022 IR 149".
    """
    if _CHARACTER_SET in header:
        result.SpecificCharacterSet = header.SpecificCharacterSet


def _repair(source: Dataset) -> tuple[Dataset, list[tuple[str, str]]]:
    declared = _declared_character_set(source)
    known = all(term in _CHARACTER_SETS for term in declared)
    # Text that is in no character set, or in one we do not know, is kept as bytes and
    # made valid Latin-1 (as is text declared Latin-1): guessing the language could
    # change the bytes the PACS matches the patient's name by.
    latin_1 = not known or declared in ([], [_LATIN_1])
    repair = _Repair(convert_encodings(declared or None) if latin_1 else None)
    header = repair.dataset(source, "")
    if declared and known:
        header.add(source[_CHARACTER_SET])
    elif declared:
        repair.done("SpecificCharacterSet", "removed: not a character set DICOM defines")
    if repair.beyond_ascii and _CHARACTER_SET not in header:
        header.SpecificCharacterSet = _LATIN_1
        repair.done(
            "SpecificCharacterSet",
            f"set to {_LATIN_1}: text beyond ASCII, no character set declared",
        )
    for keyword in _REQUIRED:
        if keyword not in header:
            setattr(header, keyword, None)
    return header, repair.repairs


def _declared_character_set(source: Dataset) -> list[str]:
    """The source's Specific Character Set as a list of terms; [] when it has none."""
    value = source.get("SpecificCharacterSet")
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(term) for term in value]


class _Repair:
    """One pass over a source: the header it yields and the repairs that made it.

    Elements are never changed in place (the header shares them with the source): a
    repaired one is a new element, and sequence items are new datasets.
    """

    def __init__(self, encodings: list[str] | None) -> None:
        # How pydicom decoded the source's text, when that text must become Latin-1.
        self.encodings = encodings
        self.repairs: list[tuple[str, str]] = []
        self.beyond_ascii = False

    def done(self, name: str, action: str) -> None:
        self.repairs.append((name, action))

    def dataset(self, source: Dataset, path: str) -> Dataset:
        header = Dataset()
        for element in source:
            if not path and element.tag in (_PIXEL_DATA, _CHARACTER_SET):
                continue
            repaired = self.element(element, path)
            if repaired is not None:
                header.add(repaired)
        return header

    def element(self, element: DataElement, path: str) -> DataElement | None:
        """The element as the header has it: itself, a repaired copy, or None."""
        # Private attributes are never copied into results; identity is kept as is.
        if element.tag.is_private or (not path and element.keyword in _IDENTITY):
            return element
        name = f"{path}{element.keyword or element.tag}"
        if element.VR == "SQ":
            items = [
                self.dataset(item, f"{name}[{index}].")
                for index, item in enumerate(element.value)
            ]
            return DataElement(element.tag, "SQ", items)
        if element.VR not in STR_VR:
            return element
        required = not path and element.keyword in _REQUIRED
        if not _valid(element):
            if required:
                self.done(name, f"emptied: invalid for VR {element.VR}")
                return DataElement(element.tag, element.VR, None)
            self.done(name, f"removed: invalid for VR {element.VR}")
            return None
        if required and element.keyword == "PatientSex" and element.value not in _PATIENT_SEXES:
            self.done(name, "emptied: not M, F or O")
            return DataElement(element.tag, element.VR, None)
        if self.encodings is not None and element.VR in CUSTOMIZABLE_CHARSET_VR:
            return self.latin_1(element, name, self.encodings)
        return element

    def latin_1(self, element: DataElement, name: str, encodings: list[str]) -> DataElement:
        """The element with its bytes as they are, bytes invalid in Latin-1 made "?".

        Bytes 0x80-0x9F are control codes in ISO_IR 100; every other byte is a
        character there, so a value without those keeps its bytes (and the element
        itself where pydicom decoded it as Latin-1 already).
        """
        if element.VM == 0:
            return element
        values = element.value if isinstance(element.value, MultiValue) else [element.value]
        texts: list[str] = []
        replaced = 0
        for value in values:
            raw = _encoded(value, encodings)
            replaced += sum(0x80 <= byte <= 0x9F for byte in raw)
            fixed = bytes(_QUESTION_MARK if 0x80 <= byte <= 0x9F else byte for byte in raw)
            self.beyond_ascii |= any(byte >= 0xA0 for byte in fixed)
            texts.append(fixed.decode("latin_1"))
        if replaced:
            count = f"{replaced} byte{'s' if replaced > 1 else ''}"
            self.done(name, f"replaced {count} with '?': invalid in {_LATIN_1}")
        if texts == [value if isinstance(value, str) else str(value) for value in values]:
            return element
        return DataElement(element.tag, element.VR, texts if len(texts) > 1 else texts[0])


def _valid(element: DataElement) -> bool:
    """Whether every value of a string element is valid for its VR, by pydicom's rules."""
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            if value is None or value == "":
                continue
            # Person names, numbers, dates: check the text they were read from.
            text = value if isinstance(value, str | bytes) else str(value)
            validate_value(element.VR, text, config.RAISE)
            if element.VR in _DATES:
                _DATES[element.VR](text)
    except ValueError:  # its message quotes the value: never passed on
        return False
    return True


def _encoded(value: object, encodings: list[str]) -> bytes:
    """The value's bytes in the source, as pydicom decoded them with `encodings`."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, PersonName) and isinstance(value.original_string, bytes):
        return value.original_string
    return encode_string(str(value), encodings)
