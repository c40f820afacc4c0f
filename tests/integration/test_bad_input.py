"""What modalities and PACS really send, broken: each object gets a specific status or
logged outcome, the node keeps serving, and nothing half-written is left behind.

The senders are DCMTK's storescu where it can produce the case, and a pynetdicom
requestor sending raw file bytes where it cannot (a dataset that contradicts its own
request); a property-based test (hypothesis) throws mutated objects at the listener
and at the decoder for a bounded number of examples.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from fractured.daemon.service import Node
from fractured.engine.preprocess import DecodeError, display_pixels, read_dataset
from tests import bombs, factory
from tests.peers import (
    PEER_ENV,
    NodeProcess,
    c_store_statuses,
    echoscu,
    in_process_node,
    need,
    storescu,
    wait_for,
)

pytestmark = pytest.mark.peers

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Every status the listener may answer a C-STORE with (scp.py).
LISTENER_STATUSES = {0x0000, 0x0122, 0xA700, 0xA900, 0xC000}


@pytest.fixture
def node(tmp_path: Path, untrained_bundle: Path):
    proc = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=1).start()
    yield proc
    proc.stop()


def statuses(proc: subprocess.CompletedProcess[str]) -> list[int]:
    return c_store_statuses(proc.stdout + proc.stderr)


def study_row(node: NodeProcess, uid: str) -> dict:
    rows = {s["study_instance_uid"]: s for s in node.status()["study_list"]}
    return rows.get(uid, {})


def analysed(node: NodeProcess, uid: str) -> dict:
    return wait_for(f"study {uid} to be analysed", lambda: (
        lambda r: r if r.get("state") in ("done", "skipped", "failed") else None)(
        study_row(node, uid)), 60)


def no_partial_files(node: NodeProcess) -> bool:
    return not [p for p in (node.folder / "spool").rglob("*") if p.name.endswith(".tmp")]


def test_dataset_without_preamble_or_file_meta_is_stored_as_a_dicom_file(
        node: NodeProcess, tmp_path: Path) -> None:
    ds = factory.xray(generate_uid())
    del ds.file_meta
    ds.preamble = None
    bare = tmp_path / "bare.dcm"
    pydicom.dcmwrite(bare, ds, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM"
    proc = storescu(node.port, [bare], extra=["-f"])  # storescu: read a bare dataset
    assert statuses(proc) == [0], proc.stdout + proc.stderr
    (spooled,) = (node.folder / "spool" / "incoming").rglob("*.dcm")
    assert spooled.read_bytes()[128:132] == b"DICM"  # the node wrote preamble + file meta
    held = pydicom.dcmread(spooled)
    assert held.SOPInstanceUID == ds.SOPInstanceUID
    assert held.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def broken_jpeg2000(folder: Path, study_uid: str) -> Path:
    """A JPEG 2000 image whose codestream is cut short and scrambled after its header."""
    ds = factory.xray(study_uid, rows=128, cols=128)
    ds.compress(JPEG2000Lossless)
    fragments = pydicom.encaps.generate_fragments(ds.PixelData)
    stream = bytearray(next(iter(fragments)))
    stream[len(stream) // 3:] = bytes(reversed(stream[len(stream) // 3:]))[: len(stream) // 3]
    ds.PixelData = pydicom.encaps.encapsulate([bytes(stream) + (b"\0" if len(stream) % 2 else b"")])
    path = folder / "broken-j2k.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_broken_jpeg2000_stream_is_held_and_left_out_with_the_reason(
        node: NodeProcess, tmp_path: Path) -> None:
    uid = generate_uid()
    good = factory.write_study(tmp_path / "good", 1)[0]
    ds = pydicom.dcmread(good)
    ds.StudyInstanceUID = uid
    ds.save_as(good, enforce_file_format=True)
    broken = broken_jpeg2000(tmp_path, uid)
    with pytest.raises(DecodeError, match="cannot decode pixel data"):
        display_pixels(read_dataset(broken))
    assert statuses(storescu(node.port, [good, broken])) == [0, 0]  # stored as received
    row = analysed(node, uid)
    assert row["state"] == "done" and row["instances"] == 2
    (event,) = node.events("image.skipped")
    assert event["reason"] == "undecodable"
    assert "cannot decode pixel data" in event["error"]


def echo(port: int) -> int | None:
    """A C-ECHO from pynetdicom: its status, or None without an association."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURED")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


class NotSent(Exception):
    """pynetdicom's requestor would not send the file (it checks the file meta)."""


def send_file_bytes(port: int, path: Path) -> int | None:
    """C-STORE a file's bytes as they are (pynetdicom takes the SOP class and transfer
    syntax from the file meta and does not decode the dataset): the C-STORE status, or
    None when the node sent no response."""
    ae = AE(ae_title="PYNETDICOM")
    try:
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        uids = [meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID,
                meta.MediaStorageSOPInstanceUID]
        if not all(pydicom.uid.UID(str(uid)).is_valid for uid in uids):
            # pynetdicom's requestor would fail encoding the request in its own thread
            raise ValueError(f"not valid UIDs: {uids}")
        ae.add_requested_context(str(uids[0]), [str(uids[1])])
    except Exception as exc:
        raise NotSent(f"no usable file meta ({exc})") from exc
    assoc = ae.associate("127.0.0.1", port, ae_title="FRACTURED")
    if not assoc.is_established:  # e.g. the node accepted no context for a bogus syntax
        raise NotSent("no presentation context accepted")
    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, undecoded
    try:
        try:
            response = assoc.send_c_store(path)
        except Exception as exc:  # raised before sending: a bad file meta, no context
            raise NotSent(str(exc)) from exc
        return int(response.Status) if "Status" in response else None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()


def peak_rss_mib(node: NodeProcess) -> int:
    """The node process's peak resident memory so far (VmHWM), in MiB."""
    assert node.proc is not None
    status = Path(f"/proc/{node.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmHWM:"))) >> 10


def test_memory_bombs_are_refused_before_they_take_memory(node: NodeProcess,
                                                          tmp_path: Path) -> None:
    """A deflate bomb (400 MiB of zeros in 408 kB) and an RLE bomb (20000 x 20000
    pixels in 6.3 MB) in a study with one real image: stored as received, refused by
    the worker before decoding, the real image analysed; a deflate bomb before the
    identity elements is refused by the listener. Before the limits the two bombs grew
    the node by 4.2 and 6.5 GB."""
    uid = generate_uid()
    good = factory.write_study(tmp_path / "good", 1)[0]
    ds = pydicom.dcmread(good)
    ds.StudyInstanceUID = uid
    ds.save_as(good, enforce_file_format=True)
    deflated = bombs.deflate_bomb(tmp_path / "deflate.dcm", uid)
    rle = bombs.rle_bomb(tmp_path / "rle.dcm", uid)
    header = bombs.deflate_bomb(tmp_path / "header.dcm", generate_uid(),
                                before_identity=True)
    before = peak_rss_mib(node)
    assert statuses(storescu(node.port, [good])) == [0]
    assert [send_file_bytes(node.port, path) for path in (deflated, rle, header)] == [
        0, 0, 0xC000]
    (refused,) = node.wait_events("store.rejected")
    assert refused["reason"] == "deflated_header_too_large"
    row = analysed(node, uid)
    assert row["state"] == "done" and row["instances"] == 3
    skipped = node.events("image.skipped")
    assert sorted(e["reason"] for e in skipped) == ["too_large", "too_large"]
    assert any("400 megapixels" in e["error"] for e in skipped)
    assert any("inflates to more than" in e["error"] for e in skipped)
    after = peak_rss_mib(node)
    print(f"node peak memory: {before} MiB before the bombs, {after} MiB after")
    assert after - before < 300
    assert echo(node.port) == 0


def test_dataset_of_another_sop_class_than_its_request_is_refused(
        node: NodeProcess, tmp_path: Path) -> None:
    ds = factory.xray(generate_uid())  # the file meta and the request say DX ...
    ds.SOPClassUID = CT_IMAGE  # ... the dataset says CT
    ds.preamble = b"\0" * 128
    path = tmp_path / "liar.dcm"
    ds.save_as(path, enforce_file_format=False)  # True would "fix" the file meta
    assert send_file_bytes(node.port, path) == 0xA900
    (event,) = wait_for("the refusal", lambda: node.events("store.rejected"), 10)
    assert event["reason"] == "sop_class_uid_mismatch"
    assert node.status()["study_list"] == []


def test_association_cut_mid_object_leaves_no_partial_file(
        node: NodeProcess, tmp_path: Path) -> None:
    """storescu killed while a 32 MB object is on the wire: whatever was acknowledged is
    held, the object in flight is not (not even in part), and the node serves on."""
    files = factory.write_study(tmp_path / "big", 6, rows=4096, cols=4096)
    with (tmp_path / "storescu.log").open("w") as out:
        sender = subprocess.Popen([need("storescu"), "-d", "-aec", "FRACTURED", "127.0.0.1",
                                   str(node.port), *map(str, files)], stdout=out,
                                  stderr=subprocess.STDOUT, env=PEER_ENV)
        time.sleep(0.5)
        sender.send_signal(signal.SIGKILL)
        sender.wait(30)
    acknowledged = c_store_statuses((tmp_path / "storescu.log").read_text(errors="replace"))
    assert len(acknowledged) < len(files), "the transfer finished before the kill"
    ended = wait_for("the association's end", lambda: node.events("association.ended"), 30)
    assert ended[0]["outcome"] in ("aborted", "connection_closed")
    # The connection's end is seen while the last object received whole may still be
    # being written: that write finishes (it was received) or is removed, never left.
    wait_for("the write in flight to end", lambda: no_partial_files(node), 30)
    held = list((node.folder / "spool" / "incoming").rglob("*.dcm"))
    # An object can be committed just before the kill with its response still unsent.
    assert len(acknowledged) <= len(held) <= len(acknowledged) + 1
    assert echoscu(node.port).returncode == 0


# --- property-based: mutated objects against the listener and the decoder -------------

def mutated(data: bytes, draw_edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in draw_edits:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut else out)


@pytest.fixture(scope="module")
def sample_files(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("samples")
    plain = factory.xray(generate_uid(), rows=48, cols=40)
    plain.save_as(folder / "plain.dcm", enforce_file_format=True)
    j2k = factory.xray(generate_uid(), rows=48, cols=40)
    j2k.compress(JPEG2000Lossless)
    j2k.save_as(folder / "j2k.dcm", enforce_file_format=True)
    return [(folder / name).read_bytes() for name in ("plain.dcm", "j2k.dcm")]


edits = st.lists(st.tuples(st.integers(132, 10**6), st.integers(0, 255)), max_size=12)
cuts = st.one_of(st.none(), st.integers(200, 6000))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's on every mangled value
@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1), changes=edits, cut=cuts)
def test_decoder_gives_an_image_or_a_decode_error(tmp_path: Path, sample_files: list[bytes],
                                                  which: int, changes: list, cut: int | None
                                                  ) -> None:
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(mutated(sample_files[which], changes, cut))
    try:
        image = display_pixels(read_dataset(path))
    except DecodeError:
        return
    assert image.ndim == 2 and float(image.min()) >= 0.0 and float(image.max()) <= 1.0


@pytest.fixture(scope="module")
def live_node(tmp_path_factory: pytest.TempPathFactory, untrained_bundle: Path):
    """A real Node in this process, so the fuzz test can look at its spool and queue."""
    node, port = in_process_node(tmp_path_factory.mktemp("fuzz-node"), untrained_bundle)
    yield node, port
    node.stop()


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1), changes=edits, cut=cuts)
def test_listener_answers_every_mutated_object_and_keeps_only_whole_ones(
        tmp_path: Path, sample_files: list[bytes], live_node: tuple[Node, int], which: int,
        changes: list, cut: int | None) -> None:
    node, port = live_node
    data = mutated(sample_files[which], changes, cut)
    path = tmp_path / "fuzz.dcm"
    path.write_bytes(data)
    try:
        status = send_file_bytes(port, path)
    except NotSent:
        assert echo(port) == 0, "the node stopped answering"
        return  # nothing the node could store reached it
    sop_uid = str(pydicom.dcmread(path, stop_before_pixels=True)
                  .file_meta.MediaStorageSOPInstanceUID)
    assert status in LISTENER_STATUSES, f"no or an unexpected answer: {status}"
    spool = node.settings.node.spool_dir
    assert not [p for p in spool.rglob("*") if p.name.endswith(".tmp")]
    if status == 0:
        held = node.queue.intake.held(sop_uid)
        assert held is not None and held.path.is_file()
        assert pydicom.dcmread(held.path).SOPInstanceUID == sop_uid
