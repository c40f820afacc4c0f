"""What one peer may take of the listener (daemon.limits), against a real node process:
a peer trickling bytes over many connections, one sending a data set that never ends,
one announcing a PDU of gigabytes; DCMTK's echoscu, an allowed peer, is answered all
the while."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from tests import factory
from tests.integration.test_bad_input import peak_rss_mib
from tests.peers import NodeProcess, c_store_statuses, echoscu, storescu, wait_for

pytestmark = pytest.mark.peers

#: Another loopback address: the trickling peer, apart from echoscu on 127.0.0.1.
OTHER_PEER = "127.0.0.2"


@pytest.fixture
def node(tmp_path: Path, untrained_bundle: Path):
    proc = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=3600,
                       node="max_connections_per_peer = 3\nmax_object_mb = 2\n"
                       "network_timeout_s = 300").start()
    yield proc
    proc.stop()


def connect_from(address: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def closed_by_node(sock: socket.socket, within_s: float = 10.0) -> bool:
    """Whether the node closed `sock` (reading finds its end) within the time."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:  # reset
        return True


def test_a_peer_trickling_bytes_holds_only_its_own_slots(node: NodeProcess,
                                                         tmp_path: Path) -> None:
    """Ten connections from one address, each sending the first byte of an association
    request and then nothing (as a peer sending a byte every minute would): three are
    taken, seven closed at once; echoscu and storescu from another address get in, and
    the node stops at once though three reads of a PDU never end (the network timeout
    is 300 s here)."""
    trickling = [connect_from(OTHER_PEER, node.port) for _ in range(10)]
    try:
        for sock in trickling:
            sock.sendall(b"\x01")
        refused = node.wait_events("association.rejected", 7)
        assert {(e["reason"], e["address"]) for e in refused} == {
            ("too_many_connections_from_peer", OTHER_PEER)}
        assert sum(closed_by_node(sock, 2) for sock in trickling) == 7
        assert echoscu(node.port).returncode == 0
        files = factory.write_study(tmp_path / "study", 2)
        assert storescu(node.port, files).returncode == 0
        started = time.monotonic()
        assert node.stop() == 0
        print(f"stopped in {time.monotonic() - started:.1f} s with 3 PDUs half read")
    finally:
        for sock in trickling:
            sock.close()


def _command_set(sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set, implicit VR little endian (PS3.7 9.3.1.1)."""
    command = Dataset()
    command.AffectedSOPClassUID = sop_class
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000  # a data set follows
    command.AffectedSOPInstanceUID = sop_instance
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, True
    write_dataset(body, command)
    encoded = body.getvalue()
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(encoded)) + encoded


def _p_data(context_id: int, control: int, payload: bytes) -> bytes:
    """A P-DATA-TF PDU with one presentation data value (PS3.8 9.3.5)."""
    item = struct.pack(">IBB", len(payload) + 2, context_id, control) + payload
    return struct.pack(">BBI", 0x04, 0x00, len(item)) + item


def test_a_data_set_that_never_ends_aborts_its_association(node: NodeProcess) -> None:
    """A peer associates, sends a C-STORE request and then data set fragments without
    the last one: past twice [node].max_object_mb (2 here) the node aborts it; echoscu
    is answered meanwhile and the node's memory does not follow the stream."""
    ae = AE(ae_title="ENDLESS")
    ae.add_requested_context(factory.DX_PRESENTATION, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FRACTURED")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    raw = assoc.dul.socket.socket
    before = peak_rss_mib(node)
    sent = 0
    try:
        raw.sendall(_p_data(context_id, 0x03, _command_set(factory.DX_PRESENTATION,
                                                           generate_uid())))
        fragment = _p_data(context_id, 0x00, bytes(256 << 10))  # data set, not the last
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sent < 64 << 20:
            raw.sendall(fragment)
            sent += 256 << 10
    except OSError:  # the node aborted and closed: sending fails
        pass
    (event,) = node.wait_events("association.aborted")
    assert (event["reason"], event["calling_ae"]) == ("object_too_large", "ENDLESS")
    assert event["received_bytes"] > 4 << 20  # twice [node].max_object_mb
    wait_for("the association to be aborted", lambda: assoc.is_aborted, 30)
    assert sent < 64 << 20  # the node stopped reading long before
    assert echoscu(node.port).returncode == 0
    assert peak_rss_mib(node) - before < 64


def test_an_object_over_the_limit_is_answered_with_a_failure_status(
        node: NodeProcess, tmp_path: Path) -> None:
    """A 3 MiB image to a node keeping 2 MiB at most: received whole, answered 0xA700,
    not kept; the association goes on (the next image is stored)."""
    big = factory.xray(generate_uid(), rows=1300, cols=1200)  # 16-bit: 3.0 MiB
    big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    (small,) = factory.write_study(tmp_path / "small", 1)
    sent = storescu(node.port, [tmp_path / "big.dcm", small], extra=["--no-halt"])
    assert c_store_statuses(sent.stdout + sent.stderr) == [0xA700, 0]
    (event,) = node.wait_events("store.rejected")
    assert event["reason"] == "object_too_large" and event["received_bytes"] > 2 << 20
    assert not node.events("association.aborted")
    assert len(list((node.folder / "spool").rglob("*.dcm"))) == 1


def test_a_pdu_longer_than_offered_closes_the_connection_unread(node: NodeProcess) -> None:
    """A PDU header announcing 4 GiB: the connection is closed at once, nothing read."""
    sock = connect_from("127.0.0.1", node.port)
    try:
        sock.sendall(struct.pack(">BBI", 0x01, 0x00, 0xFFFFFFF0) + b"\0" * 1024)
        assert closed_by_node(sock)
    finally:
        sock.close()
    (event,) = node.wait_events("association.aborted")
    assert (event["reason"], event["pdu_bytes"]) == ("pdu_too_large", 0xFFFFFFF0)
    assert echoscu(node.port).returncode == 0
