"""Files whose patient-identifying attributes hold invalid values, for the bad-input
corpus: each value is a token found nowhere else, so that a grep of a log, a metric or
a stored reason for it finds patient data that leaked, whatever said it.

The values break their VR (a date in ISO form, a name component or an ID too long, a
backslash in a single value), which is what makes libraries quote them: pydicom's
value validation warns with the value, highdicom warns with a name.
"""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests import factory

#: attribute -> an invalid value holding a token of its own
INVALID: dict[str, str] = {
    "PatientName": "Qzname" + "x" * 70 + "^Given",
    "PatientID": "QZPATIENTID" + "7" * 60,
    "PatientBirthDate": "1961-11-29",
    "AccessionNumber": "QZACCESSION-0042-TOO-LONG",
    "OtherPatientIDs": "QZOTHERID" + "8" * 60,
    "PatientAddress": "QZ Street 12\\Apt 3",
    "ReferringPhysicianName": "Qzdoctor" + "y" * 70,
    "PatientTelephoneNumbers": "QZ+41-555-0199-0000-1",
    "InstitutionName": "QZ Hospital " + "z" * 60,
    "StudyID": "QZSTUDYID-TOO-LONG",
}

#: what to grep for: each value, and the parts a library might quote on their own
TOKENS: tuple[str, ...] = (*INVALID.values(), "Qzname", "QZPATIENTID", "1961-11-29",
                           "19611129", "QZACCESSION", "QZOTHERID", "QZ Street",
                           "Qzdoctor", "QZ+41", "QZ Hospital", "QZSTUDYID")


def with_invalid_values(ds: Dataset) -> Dataset:
    """`ds` with every attribute of INVALID set to its invalid value."""
    for keyword, value in INVALID.items():
        setattr(ds, keyword, value)
    return ds


def write_study(folder: Path, images: int = 2) -> tuple[str, list[Path]]:
    """A study of `images` DX images with the invalid values; its UID and files."""
    folder.mkdir(parents=True, exist_ok=True)
    uid, series = generate_uid(), generate_uid()
    paths = []
    for i in range(images):
        ds = with_invalid_values(factory.xray(uid, series_uid=series, instance_number=i + 1,
                                              seed=i))
        path = folder / f"phi{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return uid, paths


def leaks(text: str) -> list[str]:
    """The tokens `text` holds."""
    return [token for token in TOKENS if token in text]
