"""Delivery to the PACS: backoff while it is down, across a node restart, dead letters,
`fractured retry`, and a PACS that refuses one SOP class — against DCMTK's storescp."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from fractured.config import ConfigError, DeliverySettings, Destination
from fractured.daemon import tls
from fractured.daemon.sender import retry_delay, send
from tests import factory
from tests.peers import (
    Certificates,
    NodeProcess,
    Orthanc,
    Storescp,
    free_port,
    make_certificates,
    storescu,
    wait_for,
)

SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_retry_delay_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    settings = DeliverySettings(retry_interval_s=30, max_retry_interval_s=300, jitter=0.0)
    assert [retry_delay(n, settings) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    jittery = DeliverySettings(retry_interval_s=30, max_retry_interval_s=300, jitter=0.2)
    rng = random.Random(0)
    delays = [retry_delay(2, jittery, rng) for _ in range(200)]
    assert 48 <= min(delays) < 52 and 68 < max(delays) <= 72  # 60 +- 20 %
    assert len(set(delays)) == 200  # spread out, not one moment for every node


def fractured(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fractured", *args, "--config",
                           str(node.config)], capture_output=True, text=True, timeout=60)


def send_study(node: NodeProcess, folder: Path, images: int = 2) -> None:
    proc = storescu(node.port, factory.write_study(folder, images))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def down_destination(tmp_path: Path) -> Storescp:
    """A destination that is not listening yet: start() brings the PACS back."""
    return Storescp(tmp_path / "received", port=free_port())


@pytest.mark.peers
@pytest.mark.slow
def test_a_pacs_outage_is_waited_out_across_a_restart_and_nothing_arrives_twice(
        tmp_path: Path, untrained_bundle: Path) -> None:
    """Orthanc, the PACS, is down when the results are ready and comes back later."""
    orthanc = Orthanc(tmp_path / "orthanc", modalities={})
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": orthanc.ae_title,
                         "port": orthanc.dicom_port}],
                       delivery={"retry_interval_s": 0.3, "max_retry_interval_s": 1.2,
                                 "jitter": 0.0, "max_attempts": 100}).start()
    try:
        send_study(node, tmp_path / "study")
        wait_for("four failed attempts of one object", lambda: len(
            node.events("delivery.failed")) >= 3 * 4, 60)
        sr_waits = [e["retry_in_s"] for e in node.events("delivery.failed")
                    if e["sop_class_uid"] == COMPREHENSIVE_3D_SR]
        assert sr_waits[:4] == [0.3, 0.6, 1.2, 1.2]  # doubling, then capped
        node.stop()
        node.start()  # the deliveries are in the database, not in the process
        orthanc.start()
        wait_for("every result in Orthanc", lambda: len(orthanc.get("/instances")) == 3, 60)
        wait_for("the study to be done", lambda: fractured(node, "status", "--json")
                 .stdout.count('"done"') >= 2, 30)
        assert len(node.events("delivery.sent")) == 3  # each object stored exactly once
    finally:
        node.stop()
        if orthanc.proc is not None:
            orthanc.stop()


@pytest.mark.peers
@pytest.mark.slow
def test_dead_letters_are_listed_and_retry_delivers_them(
        tmp_path: Path, untrained_bundle: Path, down_destination: Storescp) -> None:
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": down_destination.ae_title,
                         "port": down_destination.port}],
                       delivery={"retry_interval_s": 0.2, "max_attempts": 2}).start()
    try:
        send_study(node, tmp_path / "study")
        wait_for("three dead letters", lambda: len(node.events("delivery.dead_letter")) == 3, 60)
        status = fractured(node, "status")
        assert "dead letters (3; `fractured retry` sends them again):" in status.stdout
        assert "to pacs: 2 attempts, no association" in status.stdout
        wrong = fractured(node, "retry", "--destination", "nowhere")
        assert wrong.returncode == 2 and "'nowhere' is not configured" in wrong.stderr
        down_destination.start()
        retried = fractured(node, "retry")
        assert retried.returncode == 0 and "requeued 3 dead letters" in retried.stdout
        wait_for("the dead letters to arrive", lambda: len(down_destination.files()) == 3, 60)
        wait_for("no dead letter left", lambda: '"dead_letters": []' in fractured(
            node, "status", "--json").stdout, 30)
    finally:
        node.stop()
        down_destination.stop()


@pytest.mark.peers
@pytest.mark.slow
def test_a_pacs_refusing_the_sr_still_gets_the_overlays(tmp_path: Path,
                                                       untrained_bundle: Path) -> None:
    pacs = Storescp(tmp_path / "received",
                    sop_classes=("SecondaryCaptureImageStorage",)).start()
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": pacs.ae_title, "port": pacs.port}],
                       delivery={"retry_interval_s": 0.2, "max_attempts": 2}).start()
    try:
        send_study(node, tmp_path / "study")
        wait_for("the SR's dead letter", lambda: node.events("delivery.dead_letter"), 60)
        assert len(pacs.files()) == 2  # both overlays
        (letter,) = node.events("delivery.dead_letter")
        assert letter["sop_class_uid"] == COMPREHENSIVE_3D_SR
        assert letter["error"] == (f"DEST@127.0.0.1:{pacs.port} refuses Comprehensive 3D SR "
                                   "Storage objects (presentation context rejected)")
        assert {e["sop_class_uid"] for e in node.events("delivery.sent")} == {SC_STORAGE}
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.peers
@pytest.mark.slow
def test_a_summary_image_per_study_when_configured(tmp_path: Path,
                                                   untrained_bundle: Path) -> None:
    import pydicom

    pacs = Storescp(tmp_path / "received").start()
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": pacs.ae_title, "port": pacs.port}],
                       results="summary_image = true").start()
    try:
        send_study(node, tmp_path / "study", images=3)
        wait_for("SR, 3 overlays and the summary", lambda: len(pacs.files()) == 5, 60)
        overlays = sorted((pydicom.dcmread(p) for p in pacs.files()
                           if pydicom.dcmread(p).SOPClassUID == SC_STORAGE),
                          key=lambda ds: int(ds.InstanceNumber))
        assert [int(ds.InstanceNumber) for ds in overlays] == [1, 2, 3, 4]
        assert len({ds.SeriesInstanceUID for ds in overlays}) == 1
        assert len(overlays[-1].SourceImageSequence) == 3  # the summary shows them all
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.peers
def test_results_reach_a_pacs_that_takes_only_implicit_vr_little_endian(tmp_path: Path) -> None:
    """Every SCP must accept the default transfer syntax, and some accept nothing else:
    the node's files are Explicit VR LE, so it proposes both and re-encodes as it sends."""
    files = factory.write_study(tmp_path / "results", 2, rows=32, cols=32)
    pacs = Storescp(tmp_path / "pacs", syntaxes="+xi").start()
    try:
        outcomes = send("FRACTURED", Destination("pacs", pacs.ae_title, "127.0.0.1",
                                                 pacs.port), files, 30)
        assert [(o.status, o.error) for o in outcomes] == [(0, None), (0, None)]
        received = [pydicom.dcmread(p) for p in pacs.files()]
        assert {str(ds.file_meta.TransferSyntaxUID) for ds in received} == {
            pydicom.uid.ImplicitVRLittleEndian}
        assert sorted(ds.SOPInstanceUID for ds in received) == sorted(
            pydicom.dcmread(p).SOPInstanceUID for p in files)
    finally:
        pacs.stop()


class RefusingPacs:
    """A pynetdicom storage SCP answering each SOP class with a chosen C-STORE status.

    Neither Debian peer can refuse an object with a failure status (Orthanc 1.10's
    ReceivedInstanceFilter answers 0x0000, storescp has no status option), so this one
    plays the PACS that does: the node meets it over a real association on loopback.
    """

    def __init__(self, statuses: dict[str, int]) -> None:
        from pynetdicom import AE, evt

        self.statuses = statuses
        self.received: list[tuple[str, int]] = []
        self.port = free_port()
        ae = AE(ae_title="REFUSER")
        for uid in sorted({SC_STORAGE, COMPREHENSIVE_3D_SR, *statuses}):
            ae.add_supported_context(uid, [pydicom.uid.ExplicitVRLittleEndian,
                                           pydicom.uid.ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event) -> int:  # type: ignore[no-untyped-def]
        sop_class = str(event.request.AffectedSOPClassUID)
        status = self.statuses.get(sop_class, 0x0000)
        self.received.append((sop_class, status))
        return status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.mark.peers
@pytest.mark.slow
@pytest.mark.parametrize("status", [0xC000, 0xA900, 0x0122])
def test_a_permanent_refusal_is_a_dead_letter_at_once_and_transient_ones_retry(
        tmp_path: Path, untrained_bundle: Path, status: int) -> None:
    """The SR is refused for good (Cannot understand / Data Set does not match SOP
    Class / SOP Class not supported): one attempt, then a dead letter naming the status,
    while the overlays, refused with Out of Resources (0xA700), are retried."""
    pacs = RefusingPacs({COMPREHENSIVE_3D_SR: status, SC_STORAGE: 0xA700})
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": "REFUSER", "port": pacs.port}],
                       delivery={"retry_interval_s": 0.2, "max_retry_interval_s": 0.2,
                                 "jitter": 0.0, "max_attempts": 100}).start()
    try:
        send_study(node, tmp_path / "study")
        wait_for("the overlays' third attempts", lambda: len(
            [e for e in node.events("delivery.failed")
             if e["sop_class_uid"] == SC_STORAGE]) >= 2 * 3, 60)
        (letter,) = node.events("delivery.dead_letter")
        assert letter["sop_class_uid"] == COMPREHENSIVE_3D_SR and letter["attempt"] == 1
        assert letter["permanent"] is True and letter["status"] == status
        assert letter["error"] == f"refused with status 0x{status:04X} (permanent: not retried)"
        assert [s for c, s in pacs.received if c == COMPREHENSIVE_3D_SR] == [status]
        assert all(e["sop_class_uid"] == SC_STORAGE and e["status"] == 0xA700
                   for e in node.events("delivery.failed"))
        listed = fractured(node, "status")
        assert "to pacs: 1 attempts, refused with status" in listed.stdout, listed.stdout
    finally:
        node.stop()
        pacs.stop()


@pytest.mark.peers
def test_a_duplicate_sop_instance_answer_counts_as_delivered(tmp_path: Path) -> None:
    """0x0111: the PACS holds the object already (a resend after a lost response)."""
    files = factory.write_study(tmp_path / "results", 1, rows=32, cols=32)
    pacs = RefusingPacs({str(pydicom.dcmread(files[0]).SOPClassUID): 0x0111})
    try:
        (outcome,) = send("FRACTURED", Destination("pacs", "REFUSER", "127.0.0.1", pacs.port),
                          files, 30)
        assert (outcome.status, outcome.error, outcome.permanent) == (0x0111, None, False)
    finally:
        pacs.stop()


def tls_pacs(folder: Path, certs: Certificates, *, client_certificates: bool) -> Storescp:
    """storescp speaking DICOM TLS (DCMTK's default BCP 195 non-downgrading profile),
    requiring a client certificate signed by the test CA or taking any client."""
    peer = ("-rc", "+cf", str(certs.ca)) if client_certificates else ("-ic",)
    return Storescp(folder, tls=("+tls", str(certs.server_key), str(certs.server_cert),
                                 *peer)).start()


@pytest.mark.peers
def test_results_reach_a_pacs_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "pki")
    files = factory.write_study(tmp_path / "results", 2, rows=32, cols=32)
    pacs = tls_pacs(tmp_path / "pacs", certs, client_certificates=True)
    try:
        destination = Destination("pacs", pacs.ae_title, "127.0.0.1", pacs.port, tls=True,
                                  ca_file=certs.ca, certificate=certs.client_cert,
                                  private_key=certs.client_key)
        outcomes = send("FRACTURED", destination, files, 30)
        assert [(o.status, o.error) for o in outcomes] == [(0, None), (0, None)]
        assert len(pacs.files()) == 2
        without = Destination("pacs", pacs.ae_title, "127.0.0.1", pacs.port, tls=True,
                              ca_file=certs.ca)
        refused = send("FRACTURED", without, files[:1], 30)
        assert refused[0].error is not None and refused[0].error.startswith(
            f"no association by DEST@127.0.0.1:{pacs.port}"), refused[0].error
        assert len(pacs.files()) == 2  # nothing more arrived
    finally:
        pacs.stop()


@pytest.mark.peers
def test_a_pacs_certificate_from_an_unknown_ca_or_for_another_name_is_refused(
        tmp_path: Path) -> None:
    """The node verifies the PACS: an unknown CA, or a certificate not naming the host
    it was told to reach, gives no association, and the error says which."""
    certs = make_certificates(tmp_path / "pki")
    other = make_certificates(tmp_path / "other-pki")
    files = factory.write_study(tmp_path / "results", 1, rows=32, cols=32)
    pacs = tls_pacs(tmp_path / "pacs", certs, client_certificates=False)
    try:
        def error(**tls: object) -> str:
            (outcome,) = send("FRACTURED", Destination("pacs", pacs.ae_title, "127.0.0.1",
                                                       pacs.port, tls=True, **tls), files, 30)
            assert outcome.error is not None
            return outcome.error

        assert "TLS: unable to get local issuer certificate" in error(ca_file=other.ca)
        assert "Hostname mismatch" in error(ca_file=certs.ca, server_name="pacs.example")
        assert pacs.files() == []
        (sent,) = send("FRACTURED", Destination("pacs", pacs.ae_title, "127.0.0.1", pacs.port,
                                                tls=True, ca_file=certs.ca,
                                                server_name="localhost"), files, 30)
        assert sent.error is None and len(pacs.files()) == 1
    finally:
        pacs.stop()


def test_unusable_destination_tls_files_name_the_key(tmp_path: Path) -> None:
    """Checked when the node starts (service.Node), before anything is received."""
    certs = make_certificates(tmp_path / "pki")
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    where = "[[destinations]][0]"
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\]\[0\]\.ca_file: not a PEM"):
        tls.client_context(Destination("p", "P", "h", 104, tls=True, ca_file=not_pem), where)
    with pytest.raises(ConfigError, match=r"\.certificate / .*\.private_key: cannot be used"):
        tls.client_context(Destination("p", "P", "h", 104, tls=True, ca_file=certs.ca,
                                       certificate=certs.client_cert,
                                       private_key=certs.server_key), where)
    assert tls.client_context(Destination("p", "P", "h", 104), where) is None
