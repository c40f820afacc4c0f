"""The start-up scan of the spool: the spool is the record of what was received, the
database its index.

The listener answers a C-STORE only once the object's file and folder are fsynced and
its row is committed; that commit is not fsynced (queue.INTAKE_SYNCHRONOUS), so a power
cut can take back the last rows while their files stay. Before the listener opens,
the node therefore records every spool file that has no row, from the file alone (its
UIDs, and the calling AE the listener wrote into its file meta), and removes the
temporary files of writes that a crash interrupted, which were never acknowledged.

On a spool shared by several nodes (PostgreSQL) the scan covers every node's files: a
file another node has just written and not yet recorded is recorded here, and that
node's own insert then finds the row (InstanceHeld: the same file, so kept). Only this
host's interrupted writes are removed: whether another host's writer is alive cannot
be told from here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from fractured import log
from fractured.daemon.intake import InstanceHeld, ReceivedInstance
from fractured.daemon.queue import Queue
from fractured.daemon.spool import incoming_files, incoming_path
from fractured.dicom_files import read_header
from fractured.dicom_uids import is_uid
from fractured.durable import temporary_writer

#: _record's outcomes besides the reason a file cannot be recorded.
RECORDED = "recorded"
KNOWN = "known"  # its row names it by another spelling of the path (a moved spool_dir)

_log = log.get("fractured.recovery")


@dataclass(frozen=True)
class SpoolCheck:
    """What the start-up scan found."""

    files: int  # received images in the spool
    recorded: int  # of them, recorded again from the file
    unrecoverable: int  # of them, left where they are (logged with the reason)
    temporary_removed: int


def check_spool(spool_dir: Path, queue: Queue) -> SpoolCheck:
    """Remove interrupted writes and record the received images that have no row."""
    started = time.monotonic()
    removed = _remove_interrupted_writes(spool_dir)
    files = incoming_files(spool_dir)
    known = queue.intake.recorded_paths()
    recorded = unrecoverable = 0
    for path in files:
        if str(path) in known:
            continue
        outcome = _record(path, queue)
        if outcome == RECORDED:
            recorded += 1
        elif outcome != KNOWN:
            unrecoverable += 1
            _log.warning("spool.unrecoverable", path=str(path), reason=outcome)
    check = SpoolCheck(len(files), recorded, unrecoverable, removed)
    _log.info("spool.checked", files=check.files, recorded=check.recorded,
              unrecoverable=check.unrecoverable, temporary_removed=check.temporary_removed,
              seconds=round(time.monotonic() - started, 3))
    return check


def _record(path: Path, queue: Queue) -> str:
    """Record one spool file that no row names: RECORDED, KNOWN, or why it cannot be."""
    try:
        ds = read_header(path)  # a deflated file inflated no further than its header
        study, series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
        sop_instance, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
        modality = str(ds.get("Modality", ""))
        calling_ae = str(ds.file_meta.get("SendingApplicationEntityTitle", ""))
    except Exception as exc:  # any unreadable file is reported, not fatal
        return f"unreadable: {exc}"
    # Only what the listener wrote: the file is where its UIDs put it.
    if not (is_uid(study) and is_uid(series)) or path != incoming_path(
            path.parents[2], study, sop_instance):
        return "not_named_by_its_uids"
    try:
        queue.intake.record_instance(ReceivedInstance(
            study_instance_uid=study, series_instance_uid=series,
            sop_instance_uid=sop_instance, sop_class_uid=sop_class, modality=modality,
            path=path, size=path.stat().st_size, calling_ae=calling_ae), unheld=True)
    except InstanceHeld:
        held = queue.intake.held(sop_instance)
        if held is not None and held.path.is_file() and held.path.samefile(path):
            return KNOWN
        return "sop_instance_uid_held_in_another_study"
    _log.info("spool.recorded", study_instance_uid=study, sop_instance_uid=sop_instance,
              calling_ae=calling_ae)
    return RECORDED


def _remove_interrupted_writes(spool_dir: Path) -> int:
    """Remove the temporary files of this host's writes whose process is gone. On a spool
    shared by several hosts another host's pid means nothing here: its node removes its
    own when it starts."""
    removed = 0
    for path in spool_dir.rglob(".*.tmp"):
        writer = temporary_writer(path)
        if writer is None or not writer.local or _alive(writer.pid):
            continue
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process on this host (its write may be in progress)."""
    try:
        os.kill(pid, 0)  # PermissionError: another user's process, alive too
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
