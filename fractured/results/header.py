"""A source image's patient and study information, in a form highdicom can copy.

Result objects must carry the source's patient and study attributes exactly as the PACS
has them: that is how the PACS files them with the right patient. highdicom copies them
from a reference dataset, but its SR and SC constructors read nine Type 2 attributes
directly and parse the dates and times, so a real file that lacks one (an exported
Secondary Capture with no Patient's Birth Date) or holds a de-identification hash in a
date raises, and the study would get no results at all.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import DA, TM

_PIXEL_DATA = Tag("PixelData")

# Read unconditionally by highdicom's SR and SC constructors (PS3.3 Type 2 attributes).
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
_PARSED = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}


def study_header(source: Dataset) -> Dataset:
    """The source without its pixel data, with what highdicom cannot copy made empty.

    An absent Type 2 attribute becomes empty (the standard's "unknown"), and so does a
    date or time that does not parse. Every other value is kept verbatim, even where it
    breaks its VR: changing an Accession Number would stop the PACS matching the results
    to its order. The source itself is not modified.
    """
    header = Dataset()
    for element in source:
        if element.tag != _PIXEL_DATA:
            header.add(element)
    for keyword, parse in _PARSED.items():
        if keyword in header and not _parses(parse, header[keyword].value):
            delattr(header, keyword)
    for keyword in _REQUIRED:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def _parses(parse: type[DA] | type[TM], value: object) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True
