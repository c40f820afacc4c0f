"""The node as a real process against DCMTK peers: echo, store, refusals, restart.

Each test can fail on what a PACS administrator would see: a status code DCMTK
prints, a file in the spool, an object arriving at the destination.
"""

from __future__ import annotations

import signal
import stat
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests import factory
from tests.peers import (
    NodeProcess,
    Storescp,
    c_store_statuses,
    dciodvfy,
    echoscu,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.peers


@pytest.fixture
def destination(tmp_path: Path):
    scp = Storescp(tmp_path / "received").start()
    yield scp
    scp.stop()


@pytest.fixture
def node(tmp_path: Path, untrained_bundle: Path, destination: Storescp):
    proc = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "dest", "ae_title": destination.ae_title,
                         "port": destination.port}])
    proc.start()
    yield proc
    proc.stop()


def study_states(node: NodeProcess) -> dict[str, str]:
    return {s["study_instance_uid"]: s["state"] for s in node.status()["study_list"]}


def test_echo_succeeds(node: NodeProcess) -> None:
    proc = echoscu(node.port)
    assert proc.returncode == 0, proc.stderr


def test_study_is_stored_processed_and_results_delivered(
        node: NodeProcess, destination: Storescp, tmp_path: Path) -> None:
    files = factory.write_study(tmp_path / "study", 2)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    proc = storescu(node.port, files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert c_store_statuses(proc.stdout + proc.stderr) == [0, 0]

    # Acknowledged means on disk, private to the node's user.
    spooled = sorted((node.folder / "spool" / "incoming" / study_uid).glob("*.dcm"))
    assert len(spooled) == 2
    for path in spooled:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spooled[0].parent.stat().st_mode) == 0o700

    wait_for("the study to be done", lambda: study_states(node).get(study_uid) == "done", 60)
    received = destination.files()
    assert len(received) == 3  # one SR for the study, one overlay per image
    kinds = sorted(pydicom.dcmread(p).SOPClassUID.name for p in received)
    assert kinds == ["Comprehensive 3D SR Storage", "Secondary Capture Image Storage",
                     "Secondary Capture Image Storage"]
    for path in received:
        errors, warnings = dciodvfy(path)
        print(f"dciodvfy {path.name}: {len(warnings)} warnings", *warnings, sep="\n  ")
        assert errors == [], errors
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid
        assert ds.PatientID == "TEST-0001"
    sr_path = next(p for p in received if pydicom.dcmread(p).Modality == "SR")
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_image_measurement_groups() if hasattr(
        sr.content, "get_image_measurement_groups") else None
    referenced = {str(pydicom.dcmread(p).SOPInstanceUID) for p in files}
    text = str(pydicom.dcmread(sr_path))
    for uid in referenced:
        assert uid in text, "the SR must reference every source image"
    assert groups is None or len(groups) == 2
    assert "UNTRAINED" in text


def test_non_image_sop_class_is_refused_with_0122(node: NodeProcess, tmp_path: Path) -> None:
    path = factory.basic_text_sr(tmp_path / "report.dcm")
    proc = storescu(node.port, [path])
    assert c_store_statuses(proc.stdout + proc.stderr) == [0x0122], proc.stdout + proc.stderr
    assert not (node.folder / "spool" / "incoming").exists() or not any(
        (node.folder / "spool" / "incoming").rglob("*.dcm"))
    wait_for("the rejection to be logged", lambda: node.events("store.rejected"), 10)
    assert node.events("store.rejected")[0]["reason"] == "sop_class_not_supported"


def test_image_without_study_uid_is_refused_with_a900(node: NodeProcess,
                                                      tmp_path: Path) -> None:
    ds = factory.xray("1.2.3")
    del ds.StudyInstanceUID
    path = tmp_path / "nostudy.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = storescu(node.port, [path])
    assert c_store_statuses(proc.stdout + proc.stderr) == [0xA900], proc.stdout + proc.stderr
    wait_for("the rejection to be logged", lambda: node.events("store.rejected"), 10)
    assert node.events("store.rejected")[0]["reason"] == "study_instance_uid_invalid"
    assert node.status()["study_list"] == []


@pytest.mark.slow
def test_restart_after_ack_processes_and_delivers_once(
        tmp_path: Path, untrained_bundle: Path, destination: Storescp) -> None:
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "dest", "ae_title": destination.ae_title,
                         "port": destination.port}], quiet_period_s=30)
    node.start()
    files = factory.write_study(tmp_path / "study", 3)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    proc = storescu(node.port, files)
    assert c_store_statuses(proc.stdout + proc.stderr) == [0, 0, 0]
    node.stop(signal.SIGKILL)  # acknowledged, not yet processed (30 s quiet period)
    assert destination.files() == []

    node.quiet_period_s = 1
    node.start()
    try:
        wait_for("the study to be done after the restart",
                 lambda: study_states(node).get(study_uid) == "done", 60)
        status = node.status()
        (row,) = status["study_list"]
        assert row["instances"] == 3 and row["runs"] == 1 and row["delivered"] == 4
        assert len(destination.files()) == 4  # one SR + three overlays, sent once
        assert len(node.events("delivery.sent")) == 4
    finally:
        node.stop()


def test_undecodable_image_is_kept_out_of_the_analysis_with_the_reason(
        node: NodeProcess, destination: Storescp, tmp_path: Path) -> None:
    good, bad = factory.dx_study(2)
    bad.PixelData = bad.PixelData[: len(bad.PixelData) // 2]  # truncated pixel data
    files = []
    for name, ds in (("good.dcm", good), ("bad.dcm", bad)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        files.append(tmp_path / name)
    proc = storescu(node.port, files)
    # Stored as received: judging pixel data is the analysis' job, not the listener's.
    assert c_store_statuses(proc.stdout + proc.stderr) == [0, 0]
    study = str(good.StudyInstanceUID)
    wait_for("the study to be done", lambda: study_states(node).get(study) == "done", 60)
    (skipped,) = node.events("image.skipped")
    assert skipped["reason"] == "undecodable"
    assert skipped["sop_instance_uid"] == str(bad.SOPInstanceUID)
    assert "bad.dcm" not in skipped["error"] and str(bad.SOPInstanceUID) in skipped["error"]
    received = [pydicom.dcmread(p) for p in destination.files()]
    assert len(received) == 2  # the SR and the good image's overlay
    (overlay,) = [ds for ds in received if ds.Modality != "SR"]
    assert overlay.SourceImageSequence[0].ReferencedSOPInstanceUID == good.SOPInstanceUID


def test_study_with_nothing_to_analyse_is_skipped_with_the_reason(
        node: NodeProcess, destination: Storescp, tmp_path: Path) -> None:
    (ds,) = factory.dx_study(1)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm", enforce_file_format=True)
    proc = storescu(node.port, [tmp_path / "nopixels.dcm"])
    assert c_store_statuses(proc.stdout + proc.stderr) == [0], proc.stderr[-2000:]
    study = str(ds.StudyInstanceUID)
    wait_for("the study to be skipped",
             lambda: study_states(node).get(study) == "skipped", 60)
    (row,) = node.status()["study_list"]
    assert "no image" in row["reason"]
    assert "no pixel data" in node.events("image.skipped")[0]["error"]
    assert destination.files() == []


def test_sigterm_stops_the_node_cleanly(node: NodeProcess) -> None:
    assert node.stop(signal.SIGTERM) == 0
    assert node.events("node.stopped")


def test_unwritable_spool_answers_a700_and_records_nothing(node: NodeProcess,
                                                           tmp_path: Path) -> None:
    incoming = node.folder / "spool" / "incoming"
    incoming.write_bytes(b"")  # a file where the folder should be: every write fails
    files = factory.write_study(tmp_path / "study", 1)
    proc = storescu(node.port, files)
    assert c_store_statuses(proc.stdout + proc.stderr) == [0xA700]
    wait_for("the failure to be logged", lambda: node.events("store.failed"), 10)
    assert node.events("store.failed")[0]["reason"] == "spool_unwritable"
    assert node.status()["study_list"] == []


def test_late_image_gives_a_new_report_that_supersedes_the_first(
        node: NodeProcess, destination: Storescp, tmp_path: Path) -> None:
    first, late = factory.write_study(tmp_path / "study", 2)
    study_uid = str(pydicom.dcmread(first).StudyInstanceUID)
    assert c_store_statuses(storescu(node.port, [first]).stderr) == [0]
    wait_for("the first report", lambda: study_states(node).get(study_uid) == "done"
             and len(destination.files()) == 2, 60)
    (report,) = [pydicom.dcmread(p) for p in destination.files()
                 if pydicom.dcmread(p).Modality == "SR"]
    assert "PredecessorDocumentsSequence" not in report

    assert c_store_statuses(storescu(node.port, [late]).stderr) == [0]
    wait_for("the second report", lambda: len(destination.files()) == 5, 60)
    reports = [p for p in destination.files() if pydicom.dcmread(p).Modality == "SR"]
    (second,) = [p for p in reports if pydicom.dcmread(p).SOPInstanceUID != report.SOPInstanceUID]
    ds = pydicom.dcmread(second)
    (study_ref,) = ds.PredecessorDocumentsSequence
    (series_ref,) = study_ref.ReferencedSeriesSequence
    (sop_ref,) = series_ref.ReferencedSOPSequence
    assert study_ref.StudyInstanceUID == study_uid
    assert sop_ref.ReferencedSOPInstanceUID == report.SOPInstanceUID
    assert len(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence) == 2  # both images now
    errors, _ = dciodvfy(second)
    assert errors == [], errors
