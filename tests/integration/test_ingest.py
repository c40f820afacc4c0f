"""Ingest a hospital can rely on: resent images, extra SOP classes, many senders at once,
a full disk. The node is a real process (or, to inject a disk error, a real Node in this
process) and DCMTK's storescu is the sender, so every outcome is a status a modality
would see and a file or row the node holds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from fractured.daemon import reports, scp
from tests import factory
from tests.peers import (
    PEER_ENV,
    NodeProcess,
    Sender,
    c_store_statuses,
    echoscu,
    in_process_node,
    need,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.peers

MAMMOGRAPHY = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray, For Presentation


def sent(port: int, files: list[Path], *, halt: bool = True) -> list[int]:
    """storescu the files; the C-STORE statuses it got, in order. storescu stops at the
    first failure status unless told not to (-nh)."""
    proc = storescu(port, files, extra=() if halt else ["-nh"])
    return c_store_statuses(proc.stdout + proc.stderr)


def study_rows(node: NodeProcess) -> dict[str, dict]:
    return {s["study_instance_uid"]: s for s in node.status()["study_list"]}


def spooled(node: NodeProcess) -> list[Path]:
    return sorted((node.folder / node.spool_dir / "incoming").rglob("*.dcm"))


def start(tmp_path: Path, bundle: Path, **kwargs: object) -> NodeProcess:
    return NodeProcess(tmp_path / "node", bundle, [], **kwargs).start()  # type: ignore[arg-type]


def test_resent_study_is_kept_once_and_not_analysed_again(tmp_path: Path,
                                                          untrained_bundle: Path) -> None:
    node = start(tmp_path, untrained_bundle)
    try:
        files = factory.write_study(tmp_path / "study", 2)
        uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        assert sent(node.port, files) == [0, 0]
        wait_for("the study to be done", lambda: study_rows(node)[uid]["state"] == "done", 60)
        assert sent(node.port, files) == [0, 0]  # a PACS resending the study
        duplicates = node.wait_events("store.duplicate", 2)
        assert {e["outcome"] for e in duplicates} == {"kept_first"}
        time.sleep(3)  # three quiet periods: a re-opened study would have run again
        row = study_rows(node)[uid]
        assert (row["state"], row["runs"], row["instances"]) == ("done", 1, 2)
        assert len(spooled(node)) == 2
    finally:
        node.stop()


def test_replace_stores_the_new_copy_and_analyses_again(tmp_path: Path,
                                                        untrained_bundle: Path) -> None:
    node = start(tmp_path, untrained_bundle, node='duplicates = "replace"')
    try:
        (first,) = factory.write_study(tmp_path / "study", 1)
        uid = str(pydicom.dcmread(first).StudyInstanceUID)
        assert sent(node.port, [first]) == [0]
        wait_for("the first run", lambda: study_rows(node)[uid]["state"] == "done", 60)
        corrected = pydicom.dcmread(first)
        corrected.ImageComments = "corrected by the modality"
        corrected.save_as(first, enforce_file_format=True)
        assert sent(node.port, [first]) == [0]
        wait_for("the second run", lambda: (lambda r: r["runs"] == 2 and r["state"] == "done")(
            study_rows(node)[uid]), 60)
        (held,) = spooled(node)
        assert pydicom.dcmread(held).ImageComments == "corrected by the modality"
        assert study_rows(node)[uid]["instances"] == 1
    finally:
        node.stop()


def moved_copy(path: Path, folder: Path) -> tuple[Path, str]:
    """The same instance (same SOP Instance UID) filed under a new study."""
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    out = folder / "moved.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out, str(ds.StudyInstanceUID)


@pytest.mark.parametrize("mode", ["keep_first", "replace"])
def test_same_instance_in_another_study(tmp_path: Path, untrained_bundle: Path,
                                        mode: str) -> None:
    node = start(tmp_path, untrained_bundle, quiet_period_s=3600, node=f'duplicates = "{mode}"')
    try:
        (original,) = factory.write_study(tmp_path / "study", 1)
        old_uid = str(pydicom.dcmread(original).StudyInstanceUID)
        assert sent(node.port, [original]) == [0]
        moved, new_uid = moved_copy(original, tmp_path)
        statuses = sent(node.port, [moved])
        rows = study_rows(node)
        if mode == "keep_first":
            assert statuses == [0xA900]
            (event,) = node.wait_events("store.rejected", 1)
            assert event["reason"] == "sop_instance_uid_held_in_another_study"
            assert new_uid not in rows and rows[old_uid]["instances"] == 1
            assert [p.parent.name for p in spooled(node)] == [old_uid]
        else:
            assert statuses == [0]
            assert rows[new_uid]["instances"] == 1 and rows[old_uid]["instances"] == 0
            assert [p.parent.name for p in spooled(node)] == [new_uid]  # old file removed
    finally:
        node.stop()


def mammogram(folder: Path) -> Path:
    ds = factory.xray(pydicom.uid.generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MAMMOGRAPHY
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / "mg.dcm", enforce_file_format=True)
    return folder / "mg.dcm"


def test_storage_class_outside_the_list_is_refused_unless_configured(
        tmp_path: Path, untrained_bundle: Path) -> None:
    image = mammogram(tmp_path / "mg")
    plain = NodeProcess(tmp_path / "plain", untrained_bundle, [], quiet_period_s=3600).start()
    try:
        assert sent(plain.port, [image]) == [0x0122]
    finally:
        plain.stop()
    extended = NodeProcess(tmp_path / "extended", untrained_bundle, [], quiet_period_s=3600,
                           node=f'extra_sop_classes = ["{MAMMOGRAPHY}"]').start()
    try:
        assert sent(extended.port, [image]) == [0]
        assert len(spooled(extended)) == 1
    finally:
        extended.stop()


#: A vendor's private storage class, and a standard projection X-ray class that
#: pynetdicom's list of 120 storage contexts leaves out (Breast Projection X-Ray).
PRIVATE_CLASS = "1.3.6.1.4.1.99999.7.1"
BREAST_PROJECTION = "1.2.840.10008.5.1.4.1.1.13.1.4"


def stored_with_pynetdicom(port: int, sop_class: str) -> int | None:
    """C-STORE one image under `sop_class` with a pynetdicom client (DCMTK's storescu
    will not propose a class it does not know); its status, or None when the class was
    not accepted at association (pynetdicom then aborts: no context to use)."""
    from pynetdicom import AE

    ds = factory.xray(pydicom.uid.generate_uid())
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(sop_class, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURED")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


@pytest.mark.parametrize("sop_class", [PRIVATE_CLASS, BREAST_PROJECTION])
def test_storage_class_pynetdicom_does_not_list_is_negotiated_when_configured(
        tmp_path: Path, untrained_bundle: Path, sop_class: str) -> None:
    plain = NodeProcess(tmp_path / "plain", untrained_bundle, [], quiet_period_s=3600).start()
    try:
        assert stored_with_pynetdicom(plain.port, sop_class) is None
    finally:
        plain.stop()
    extended = NodeProcess(tmp_path / "extended", untrained_bundle, [], quiet_period_s=3600,
                           node=f'extra_sop_classes = ["{sop_class}"]').start()
    try:
        assert stored_with_pynetdicom(extended.port, sop_class) == 0
        (image,) = spooled(extended)
        assert pydicom.dcmread(image).SOPClassUID == sop_class
    finally:
        extended.stop()


@pytest.mark.slow
def test_16_concurrent_associations_of_50_instances_are_all_stored(
        tmp_path: Path, untrained_bundle: Path) -> None:
    node = start(tmp_path, untrained_bundle, quiet_period_s=3600)
    try:
        studies = [factory.write_study(tmp_path / f"s{i:02d}", 50, rows=64, cols=64)
                   for i in range(16)]
        senders = [Sender(node.port, files, tmp_path / f"storescu{i:02d}.log",
                          calling=f"SENDER{i:02d}") for i, files in enumerate(studies)]
        outputs = [sender.output() for sender in senders]
        for i, output in enumerate(outputs):
            summary = "\n".join(ln for ln in output.splitlines() if not ln.startswith("D:"))
            assert c_store_statuses(output) == [0] * 50, f"sender {i}: {summary[-3000:]}"
        rows = study_rows(node)
        assert len(rows) == 16 and {r["instances"] for r in rows.values()} == {50}
        assert len(spooled(node)) == 800
        ended = node.wait_events("association.ended", 16)
        assert sorted(e["instances"] for e in ended) == [50] * 16
    finally:
        node.stop()


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 1 MiB tmpfs, where this machine lets the tests mount one (root in a container
    with mount rights; CI here). Yields its mount point; unmounted afterwards."""
    point = tmp_path / "spool"
    point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                           str(point)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                    "the injected-ENOSPC test covers the full disk")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def test_full_spool_answers_a700_keeps_what_it_acknowledged_and_recovers(
        tmp_path: Path, untrained_bundle: Path, small_tmpfs: Path) -> None:
    node = start(tmp_path, untrained_bundle, quiet_period_s=3600, spool_dir=str(small_tmpfs))
    try:
        files = factory.write_study(tmp_path / "study", 12)  # ~145 kB each: 1 MiB holds ~6
        statuses = sent(node.port, files, halt=False)
        assert len(statuses) == 12 and set(statuses) == {0, 0xA700}, statuses
        refused = [f for f, status in zip(files, statuses, strict=True) if status == 0xA700]
        assert 0 < len(refused) < 12
        assert {e["reason"] for e in node.events("store.failed")} == {"spool_unwritable"}
        assert no_temporary_files(small_tmpfs)
        (row,) = study_rows(node).values()
        assert row["instances"] == 12 - len(refused) == len(spooled(node))
        assert echoscu(node.port).returncode == 0  # still serving

        subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)
        assert sent(node.port, refused) == [0] * len(refused)
        (row,) = study_rows(node).values()
        assert row["instances"] == 12 == len(spooled(node))
    finally:
        node.stop()


def test_enospc_at_fsync_leaves_nothing_half_written_and_recovers(
        tmp_path: Path, untrained_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no tmpfs can be mounted: the disk error is injected at the fsync of spool
    files (where a full disk with delayed allocation reports it), in a real Node."""
    spool = tmp_path / "spool"  # in_process_node's
    real_fsync, full = os.fsync, {"on": True}

    def fsync(fd: int) -> None:
        target = os.readlink(f"/proc/self/fd/{fd}")
        if full["on"] and target.startswith(str(spool / "incoming")) and target.endswith(".tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    node, port = in_process_node(tmp_path, untrained_bundle)
    try:
        files = factory.write_study(tmp_path / "study", 3)
        assert sent(port, files, halt=False) == [0xA700] * 3
        assert reports.studies(node.queue.engine) == []
        assert no_temporary_files(spool) and not list(spool.rglob("*.dcm"))
        full["on"] = False  # space is back
        assert sent(port, files) == [0] * 3
        assert [s["instances"] for s in reports.studies(node.queue.engine)] == [3]
    finally:
        node.stop()


def test_copies_of_one_instance_sent_at_once_keep_the_recorded_copy_on_disk(
        tmp_path: Path, untrained_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of one instance, different bytes, on two associations at once
    (keep_first): each copy's spool write waits up to a second for the other's, so
    that without turns both would be written before either is recorded. The row kept
    and the file on disk must be the same copy, every time."""
    real_write = scp.write_durably
    meeting: dict[str, threading.Barrier] = {}

    def write_then_meet(path: Path, data: bytes, mode: int = 0o600) -> None:
        real_write(path, data, mode)
        with contextlib.suppress(threading.BrokenBarrierError):
            meeting[path.stem].wait(timeout=1)

    monkeypatch.setattr(scp, "write_durably", write_then_meet)
    node, port = in_process_node(tmp_path, untrained_bundle)
    try:
        for round_ in range(20):
            ds = factory.xray(pydicom.uid.generate_uid())
            copies = []
            for i, comment in enumerate(("short", "a much longer comment" * 20)):
                ds.ImageComments = comment
                ds.save_as(tmp_path / f"copy{round_}-{i}.dcm", enforce_file_format=True)
                copies.append(tmp_path / f"copy{round_}-{i}.dcm")
            meeting[str(ds.SOPInstanceUID)] = threading.Barrier(2)
            senders = [subprocess.Popen(
                [need("storescu"), "-aec", "FRACTURED", "127.0.0.1", str(port), str(copy)],
                env=PEER_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for copy in copies]
            assert [p.wait(60) for p in senders] == [0, 0]
            with node.queue.engine.connect() as db:
                (path, size), = db.execute(text(
                    "SELECT path, size FROM instances WHERE sop_instance_uid = :uid"),
                    {"uid": str(ds.SOPInstanceUID)}).all()
            assert Path(path).stat().st_size == size, f"round {round_}"
    finally:
        node.stop()


def test_a_copy_written_for_a_study_that_does_not_hold_it_goes_on_a_database_error(
        tmp_path: Path, untrained_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same instance filed under a new study (keep_first): its row is found in the
    other study, and the look-up of that row fails (the database went away): the
    C-STORE fails, and the file written under the new study goes with it."""
    node, port = in_process_node(tmp_path, untrained_bundle)
    try:
        (original,) = factory.write_study(tmp_path / "study", 1)
        assert sent(port, [original]) == [0]
        moved, new_uid = moved_copy(original, tmp_path)

        def unreachable(_uid: str) -> None:
            raise OperationalError("SELECT", {}, Exception("database is gone"))

        monkeypatch.setattr(node.queue.intake, "held", unreachable)
        assert sent(port, [moved], halt=False) == [0xA700]
        assert not (tmp_path / "spool" / "incoming" / new_uid).exists() or not list(
            (tmp_path / "spool" / "incoming" / new_uid).iterdir())
    finally:
        node.stop()


def jpeg_baseline(study_uid: str) -> pydicom.Dataset:
    """An 8-bit greyscale radiograph in JPEG Baseline, encoded with OpenCV."""
    import cv2
    import numpy as np

    ds = factory.xray(study_uid, rows=64, cols=48)
    pixels = (ds.pixel_array >> 4).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    for keyword in ("WindowCenter", "WindowWidth", "RescaleIntercept", "RescaleSlope"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.PixelData = pydicom.encaps.encapsulate([jpeg.tobytes()])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    ds["PixelData"].VR = "OB"
    return ds


def transfer_syntax_corpus(folder: Path, study_uid: str) -> list[Path]:
    """One image per common transfer syntax: encoded here where pydicom can, JPEG
    Baseline with OpenCV, JPEG Extended / Lossless from pydicom's test files."""
    from pydicom.data import get_testdata_file
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (syntax, how) in enumerate([
            (ImplicitVRLittleEndian, "write"), (ExplicitVRBigEndian, "write"),
            (DeflatedExplicitVRLittleEndian, "write"), (RLELossless, "compress"),
            (JPEGLSLossless, "compress"), (JPEGLSNearLossless, "compress"),
            (JPEG2000Lossless, "compress")]):
        ds = factory.xray(study_uid, rows=64, cols=48, seed=i)
        if how == "compress":
            ds.compress(syntax, **({"jls_error": 2} if syntax == JPEGLSNearLossless else {}))
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        out.append(folder / f"{i}-{syntax.name.replace(' ', '_')}.dcm")
        ds.save_as(out[-1], enforce_file_format=True)
    baseline = jpeg_baseline(study_uid)
    out.append(folder / "jpeg-baseline.dcm")
    baseline.save_as(out[-1], enforce_file_format=True)
    for name in ("JPEG-lossy.dcm", "JPEG-LL.dcm"):  # JPEG Extended, JPEG Lossless
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = study_uid
        out.append(folder / name)
        ds.save_as(out[-1], enforce_file_format=True)
    return out


def test_every_common_transfer_syntax_is_stored_as_received(tmp_path: Path,
                                                             untrained_bundle: Path) -> None:
    from fractured.engine.preprocess import display_pixels, read_dataset

    study_uid = pydicom.uid.generate_uid()
    files = transfer_syntax_corpus(tmp_path / "corpus", study_uid)
    node = start(tmp_path, untrained_bundle, quiet_period_s=3600)
    try:
        assert sent(node.port, files) == [0] * len(files)
        held = {pydicom.dcmread(p).SOPInstanceUID: p for p in spooled(node)}
        assert len(held) == len(files)
        for path in files:
            original = pydicom.dcmread(path)
            stored = pydicom.dcmread(held[original.SOPInstanceUID])
            syntax = original.file_meta.TransferSyntaxUID
            assert stored.file_meta.TransferSyntaxUID == syntax, syntax.name
            # who sent it and who received it, so the file alone can be recorded again
            assert stored.file_meta.SendingApplicationEntityTitle == "STORESCU"
            assert stored.file_meta.ReceivingApplicationEntityTitle == node.ae_title
            assert stored.PixelData == original.PixelData, f"{syntax.name}: pixels changed"
            if path.name == "JPEG-lossy.dcm":
                continue  # its 12-bit stream has a misplaced marker: no decoder takes it
            image = display_pixels(read_dataset(held[original.SOPInstanceUID]))
            assert image.shape == (original.Rows, original.Columns), syntax.name
    finally:
        node.stop()
