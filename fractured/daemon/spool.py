"""Spool naming: DICOM UIDs name the spool's files and folders, so they are checked
(fractured.dicom_uids) before they touch the file system (durable writing is
fractured.durable)."""

from __future__ import annotations

from pathlib import Path


def incoming_path(spool_dir: Path, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """Where a received image is kept: incoming/<study UID>/<SOP instance UID>.dcm."""
    return spool_dir / "incoming" / study_instance_uid / f"{sop_instance_uid}.dcm"


def incoming_files(spool_dir: Path) -> list[Path]:
    """Every received image file in the spool, in name order."""
    return sorted((spool_dir / "incoming").glob("*/*.dcm"))

