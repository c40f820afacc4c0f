"""Patient data stays out of the log, the metrics and the stored reasons, by construction.

Libraries quote the values they find fault with: pydicom's value validation warns
"Invalid value for VR DA: '1980-01-31'" (a birth date) through its logger and Python's
warnings, highdicom a person's name, and an exception's text carries such a quote into
whatever logs or stores it. So, in every process that logs (`log.configure` calls
`keep_values_out_of_logs`):

- pydicom validates no value on reading or writing (the node repairs headers with its
  own explicit checks, results.header) and its logger is silent;
- a warning raised inside a DICOM library is logged as its category and place only;
- a text made from an error about a study passes a `Redactor` holding the values of
  that study's identifying attributes, which it replaces, before it is logged or
  stored (daemon.worker).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

#: Attributes that identify a patient (PS3.15 Annex E's basic profile, those a
#: radiograph's header carries): their values never leave the node but in results.
IDENTIFYING = (
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs",
    "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate",
    "PatientBirthTime", "PatientAddress", "PatientTelephoneNumbers", "AccessionNumber",
    "StudyID", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "RequestingPhysician", "InstitutionName", "InstitutionAddress", "ResponsiblePerson",
    "MilitaryRank", "MedicalRecordLocator", "PatientComments",
)
#: Libraries whose warnings may quote a value of a data set.
DICOM_LIBRARIES = ("pydicom", "highdicom", "pynetdicom", "pylibjpeg", "openjpeg")
#: Shorter pieces of a value are left alone: "M", "12", a name's initial.
MIN_PIECE = 3
REDACTED = "<redacted>"

_library_file = re.compile(rf"[/\\]({'|'.join(DICOM_LIBRARIES)})[/\\]")
_warnings_log = logging.getLogger("py.warnings")


def keep_values_out_of_logs() -> None:
    """Set this process up so that no library logs a data set's value (module doc)."""
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    warnings.showwarning = _show_warning


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    """Python's warnings as log lines; a DICOM library's without its text."""
    if _library_file.search(filename):
        _warnings_log.warning("%s at %s:%d (text withheld: it may quote patient data)",
                              category.__name__, Path(filename).name, lineno)
    else:
        _warnings_log.warning("%s: %s", category.__name__, message)


def _pieces(value: Any) -> Iterable[str]:
    """A value's text and the parts a library might quote alone (a name's components,
    a multi-value's items)."""
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    for item in items:
        text = item.decode("latin-1") if isinstance(item, bytes) else str(item)
        yield text
        yield from re.split(r"[\^=\\]", text)


class Redactor:
    """Replaces the values of a study's identifying attributes in a text."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        pieces = {v.strip() for v in values if len(v.strip()) >= MIN_PIECE}
        # longest first, so that a whole value goes before its parts
        self._pattern = re.compile("|".join(re.escape(p) for p in sorted(
            pieces, key=len, reverse=True))) if pieces else None

    @classmethod
    def of(cls, headers: Iterable[Dataset]) -> Redactor:
        values: list[str] = []
        for ds in headers:
            for keyword in IDENTIFYING:
                element = ds.get(keyword)
                if element is None:
                    continue
                try:
                    values.extend(_pieces(element))
                except Exception:  # a value pydicom cannot decode: its raw bytes then
                    raw = ds.get_item(keyword)
                    if raw is not None and isinstance(raw.value, bytes):
                        values.extend(_pieces(raw.value))
        return cls(values)

    def __call__(self, text: str) -> str:
        return text if self._pattern is None else self._pattern.sub(REDACTED, text)
