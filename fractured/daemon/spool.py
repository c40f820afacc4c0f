"""Spool naming rules: DICOM UIDs name the spool's files and folders, so they are
checked before they touch the file system (durable writing is fractured.durable)."""

from __future__ import annotations

import re

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: str) -> bool:
    """A syntactically valid DICOM UID (also what makes it safe as a file name)."""
    return len(value) <= 64 and bool(_UID.match(value))
