"""Spool naming rules: DICOM UIDs name the spool's files and folders, so they are
checked before they touch the file system (durable writing is fractured.durable)."""

from __future__ import annotations

import re
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def incoming_path(spool_dir: Path, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """Where a received image is kept: incoming/<study UID>/<SOP instance UID>.dcm."""
    return spool_dir / "incoming" / study_instance_uid / f"{sop_instance_uid}.dcm"


def incoming_files(spool_dir: Path) -> list[Path]:
    """Every received image file in the spool, in name order."""
    return sorted((spool_dir / "incoming").glob("*/*.dcm"))


def is_uid(value: str) -> bool:
    """A syntactically valid DICOM UID (also what makes it safe as a file name)."""
    return len(value) <= 64 and bool(_UID.match(value))
