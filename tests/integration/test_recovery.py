"""The start-up scan of the spool (daemon.recovery): a received image whose row a power
cut took back is recorded again from its file, and interrupted writes are removed.

A power cut cannot be staged in a test; what it leaves can: files fsynced and answered,
their rows gone (the listener's commits are not fsynced, queue.INTAKE_SYNCHRONOUS).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from fractured.daemon import reports
from fractured.daemon.connection import make_engine
from fractured.daemon.queue import Queue
from fractured.daemon.recovery import check_spool
from fractured.daemon.spool import incoming_files
from fractured.durable import HOST, TemporaryWriter, temporary_writer, write_durably
from tests import factory
from tests.peers import NodeProcess, c_store_statuses, dciodvfy, storescu


def test_intake_commits_skip_the_fsync_and_the_rest_keep_it(tmp_path: Path) -> None:
    queue = Queue(make_engine(f"sqlite:///{tmp_path / 'q.db'}"))
    with queue.intake.engine.connect() as intake, queue.engine.connect() as main:
        assert intake.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert main.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert intake.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    queue.close()


@pytest.mark.peers
def test_images_whose_rows_a_power_cut_took_are_recorded_and_analysed(
        tmp_path: Path, untrained_bundle: Path) -> None:
    files = factory.write_study(tmp_path / "study", 3)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    node = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=3600).start()
    try:
        proc = storescu(node.port, files, calling="MODALITY1")
        assert c_store_statuses(proc.stdout + proc.stderr) == [0, 0, 0]
    finally:
        node.stop()
    spooled = incoming_files(node.folder / "spool")
    assert len(spooled) == 3
    for path in spooled:  # the node's own file meta in front of the received dataset
        assert dciodvfy(path)[0] == [], path
    with sqlite3.connect(node.folder / "fractured.db") as db:  # what the cut took back
        db.execute("DELETE FROM instances")
        db.execute("DELETE FROM studies")

    node.quiet_period_s = 1.0
    node.start()
    try:
        checked = node.wait_events("spool.checked", 2)[-1]  # this start's (the log goes on)
        assert (checked["files"], checked["recorded"], checked["unrecoverable"]) == (3, 3, 0)
        node.wait_events("study.processed", timeout=60)
        (study,) = node.status()["study_list"]
        assert (study["study_instance_uid"], study["instances"]) == (study_uid, 3)
    finally:
        node.stop()
    with sqlite3.connect(node.folder / "fractured.db") as db:
        assert {row[0] for row in db.execute("SELECT calling_ae FROM instances")} == {
            "MODALITY1"}


def dead_pid() -> int:
    """The pid of a process that has just exited (not reused this soon)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_interrupted_writes_go_and_unreadable_files_stay(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    (image,) = factory.write_study(tmp_path / "study", 1)
    ds = pydicom.dcmread(image)
    folder = spool / "incoming" / str(ds.StudyInstanceUID)
    folder.mkdir(parents=True)
    good = folder / f"{ds.SOPInstanceUID}.dcm"
    good.write_bytes(image.read_bytes())
    misnamed = folder / "1.2.3.dcm"
    misnamed.write_bytes(image.read_bytes())
    garbage = folder / "1.2.4.dcm"
    garbage.write_bytes(b"not a DICOM file")
    interrupted = folder / f".1.2.5.dcm.{dead_pid()}-7.tmp"
    interrupted.write_bytes(b"half")
    in_progress = folder / f".1.2.6.dcm.{os.getpid()}-7.tmp"  # a live writer's
    in_progress.write_bytes(b"half")
    queue = Queue(make_engine(f"sqlite:///{tmp_path / 'q.db'}"))

    check = check_spool(spool, queue)
    assert (check.files, check.recorded, check.unrecoverable, check.temporary_removed) == (
        3, 1, 2, 1)
    assert not interrupted.exists() and in_progress.exists()
    assert misnamed.exists() and garbage.exists()  # left for the administrator
    assert queue.intake.recorded_paths() == {str(good)}
    (row,) = reports.studies(queue.engine)
    assert (row["study_instance_uid"], row["instances"]) == (str(ds.StudyInstanceUID), 1)

    again = check_spool(spool, queue)  # a second start finds nothing more to do
    assert (again.recorded, again.unrecoverable, again.temporary_removed) == (0, 2, 0)
    # nor does one whose spool_dir is spelled another way (relative, not absolute)
    monkeypatch.chdir(tmp_path)
    moved = check_spool(Path("spool"), queue)
    assert (moved.files, moved.recorded, moved.unrecoverable) == (3, 0, 2)
    queue.close()


def test_only_this_hosts_interrupted_writes_go_on_a_shared_spool(tmp_path: Path) -> None:
    """Several hosts write to one spool: a pid in another host's temporary name says
    nothing about a process here, so that file is left to its own host's node."""
    folder = tmp_path / "spool" / "incoming" / "1.2.3"
    folder.mkdir(parents=True)
    written = folder / "1.2.3.1.dcm"
    write_durably(written, b"x")  # the name write_durably uses carries this host
    assert not list(folder.glob(".*.tmp"))
    pid = dead_pid()
    mine = folder / f".1.2.3.2.dcm.{pid}-7@{HOST}.tmp"
    theirs = folder / f".1.2.3.3.dcm.{pid}-7@other-host.example.org.tmp"
    for path in (mine, theirs):
        path.write_bytes(b"half")
    assert temporary_writer(theirs) == TemporaryWriter(pid, "other-host.example.org")
    queue = Queue(make_engine(f"sqlite:///{tmp_path / 'q.db'}"))
    assert check_spool(tmp_path / "spool", queue).temporary_removed == 1
    assert not mine.exists() and theirs.exists()
    queue.close()
