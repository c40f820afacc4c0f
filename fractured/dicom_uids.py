"""DICOM unique identifiers (PS3.5 9.1): what a valid one looks like.

The rule is the node's (a UID names spool files and folders, so it is checked first)
and the configuration's (a UID root an administrator sets), hence its own module.
"""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_uid(value: str) -> bool:
    """A syntactically valid DICOM UID (also what makes it safe as a file name)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None
