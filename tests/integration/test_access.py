"""Who may talk to the node: the AE/address allow-list, DICOM TLS, the audit trail.

The node runs as a real process; DCMTK's echoscu and storescu are the peers, so each
refusal is what a modality's log would show, and each acceptance is an image on disk.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from ipaddress import ip_network
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from structlog.testing import capture_logs

from fractured import config
from fractured.daemon import access
from fractured.daemon.access import AccessPolicy, ClosedByDefault, Refusal
from fractured.daemon.metrics import NodeMetrics
from tests import factory
from tests.peers import (
    Certificates,
    NodeProcess,
    c_store_statuses,
    echoscu,
    free_port,
    make_certificates,
    storescu,
    wait_for,
)

ALLOW_LIST = """
[access]
require_called_ae_title = true

[[access.peers]]
ae_title = "STORESCU"
addresses = ["127.0.0.1"]

[[access.peers]]
ae_title = "ECHOSCU"
addresses = ["127.0.0.0/8", "::1"]

[[access.peers]]
ae_title = "FARAWAY"
addresses = ["10.0.0.0/8"]
"""


def policy(text: str) -> AccessPolicy:
    settings = config.from_dict(tomllib.loads(text), base=Path("."))
    return AccessPolicy.from_settings(settings.access)


def test_policy_decides_by_ae_title_then_address() -> None:
    rules = policy(ALLOW_LIST)
    assert rules.refusal("STORESCU", "127.0.0.1") is None
    assert rules.refusal("STORESCU  ", "127.0.0.1") is None  # AE titles are space-padded
    assert rules.refusal("STORESCU", "127.0.0.2") is Refusal.ADDRESS_NOT_ALLOWED
    assert rules.refusal("storescu", "127.0.0.1") is Refusal.CALLING_AE_NOT_ALLOWED
    assert rules.refusal("FARAWAY", "10.9.8.7") is None
    assert rules.refusal("FARAWAY", "::ffff:10.9.8.7") is None  # dual-stack listener
    assert rules.refusal("FARAWAY", "11.0.0.1") is Refusal.ADDRESS_NOT_ALLOWED
    assert rules.refusal("ECHOSCU", "::1") is None
    open_bench = policy("[access]\nallow_any = true")
    assert open_bench.open and open_bench.refusal("ANYONE", "192.0.2.1") is None
    with pytest.raises(ClosedByDefault, match=r"allow_any = true.*not a hospital network"):
        policy("")  # no list, and nobody said anyone may come in


@pytest.mark.parametrize(("text", "message"), [
    ('[[access.peers]]\nae_title = "A"\naddresses = ["10.0.0.300"]',
     r"\[\[access.peers\]\]\[0\].addresses\[0\]: not an IP address or network"),
    ('[[access.peers]]\nae_title = "A"\naddresses = []',
     r"\[\[access.peers\]\]\[0\].addresses: list at least one"),
    ('[[access.peers]]\nae_title = "A"\naddresses = ["::1"]\n'
     '[[access.peers]]\nae_title = "A"\naddresses = ["10.0.0.1"]',
     r"\[\[access.peers\]\]\[1\].ae_title: 'A' is listed twice"),
    ('[[access.peers]]\nae_title = "A"', r"\[access\].peers\[0\].addresses: required key"),
    ('[[access.peers]]\nae_title = "MUCH_TOO_LONG_AE_TITLE"\naddresses = ["::1"]',
     r"\[\[access.peers\]\]\[0\].ae_title: an AE title is 1-16 characters"),
    ('[access]\nallow_any = true\n[[access.peers]]\nae_title = "A"\naddresses = ["::1"]',
     r"\[access\].allow_any: true, yet \[\[access.peers\]\] are listed"),
    ("[tls]\nenabled = true", r"\[tls\].certificate: required when \[tls\].enabled"),
    ('[tls]\nenabled = true\ncertificate = "nope.crt"\nprivate_key = "nope.key"',
     r"\[tls\].certificate: file not found"),
])
def test_access_and_tls_mistakes_name_the_key(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message):
        config.from_dict(tomllib.loads(text), base=Path("/nonexistent"))


@pytest.fixture
def guarded_node(tmp_path: Path, untrained_bundle: Path):
    proc = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=3600,
                       access="", sections=ALLOW_LIST)
    proc.start()
    yield proc
    proc.stop()


def rejections(node: NodeProcess, count: int) -> list[dict]:
    return node.wait_events("association.rejected", count, 10)


@pytest.mark.peers
def test_a_node_with_no_peers_listed_refuses_to_start_naming_the_choice(
        tmp_path: Path, untrained_bundle: Path) -> None:
    node = NodeProcess(tmp_path / "node", untrained_bundle, [], access="")
    node.folder.mkdir(parents=True)
    node.write_config()
    proc = subprocess.run([sys.executable, "-m", "fractured", "serve", "--config",
                           str(node.config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{node.config}: [access]: no [[access.peers]] are listed" in proc.stderr
    assert "set allow_any = true in [access]" in proc.stderr
    assert not (node.folder / "fractured.db").exists()  # refused before anything opened


class BrokenPolicy(AccessPolicy):
    """An allow-list whose check fails (a bug, a resolver error): what the listener's
    handler must survive by refusing."""

    def refusal(self, calling_ae: str, address: str,
                certificate_cn: str | None = None) -> Refusal | None:
        raise RuntimeError("check failed")


@pytest.mark.peers
def test_an_access_check_that_fails_rejects_the_association() -> None:
    """pynetdicom swallows an exception of an EVT_REQUESTED handler and goes on: the
    handler itself must refuse. A real listener with the node's handlers, echoscu as
    the peer; the same listener with a working check lets it in."""
    for checked, accepted in ((BrokenPolicy({"ECHOSCU": ()}), False),
                              (AccessPolicy({"ECHOSCU": (ip_network("127.0.0.0/8"),)}), True)):
        ae = AE(ae_title="FRACTURED")
        ae.add_supported_context(Verification)
        port = free_port()
        with capture_logs() as logs:
            server = ae.start_server(("127.0.0.1", port), block=False,
                                     evt_handlers=access.handlers(checked, NodeMetrics()))
            try:
                proc = echoscu(port)
            finally:
                server.shutdown()
        assert (proc.returncode == 0) is accepted, proc.stdout + proc.stderr
        refused = [e for e in logs if e["event"] == "association.rejected"]
        if accepted:
            assert refused == []
        else:
            assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
            assert [(e["reason"], e["error"]) for e in refused] == [
                ("access_check_failed", "RuntimeError: check failed")]


@pytest.mark.peers
def test_unknown_calling_ae_is_rejected_and_logged(guarded_node: NodeProcess) -> None:
    proc = echoscu(guarded_node.port, calling="INTRUDER")
    assert proc.returncode != 0
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    (event,) = rejections(guarded_node, 1)
    assert event["reason"] == "calling_ae_not_allowed"
    assert event["calling_ae"] == "INTRUDER"
    assert event["address"] == "127.0.0.1"


@pytest.mark.peers
def test_listed_ae_from_another_address_is_rejected(guarded_node: NodeProcess,
                                                    tmp_path: Path) -> None:
    files = factory.write_study(tmp_path / "study", 1)
    proc = storescu(guarded_node.port, files, calling="FARAWAY")
    assert proc.returncode != 0
    assert c_store_statuses(proc.stdout + proc.stderr) == []
    assert "Calling AE Title Not Recognized" in proc.stdout + proc.stderr
    (event,) = rejections(guarded_node, 1)
    assert event["reason"] == "address_not_allowed"
    assert guarded_node.status()["study_list"] == []
    assert not list((guarded_node.folder / "spool").rglob("*.dcm"))


@pytest.mark.peers
def test_wrong_called_ae_title_is_rejected(guarded_node: NodeProcess) -> None:
    proc = echoscu(guarded_node.port, called="SOMEONE_ELSE")
    assert proc.returncode != 0
    assert "Called AE Title Not Recognized" in proc.stdout + proc.stderr
    (event,) = rejections(guarded_node, 1)
    assert event["reason"] == "called_ae_not_recognised"


@pytest.mark.peers
def test_allowed_peer_stores_after_refusals_and_is_audited(guarded_node: NodeProcess,
                                                           tmp_path: Path) -> None:
    assert echoscu(guarded_node.port, calling="INTRUDER").returncode != 0
    assert echoscu(guarded_node.port).returncode == 0  # ECHOSCU from 127/8
    files = factory.write_study(tmp_path / "study", 3)
    proc = storescu(guarded_node.port, files)
    assert c_store_statuses(proc.stdout + proc.stderr) == [0, 0, 0]
    echo, store = guarded_node.wait_events("association.ended", 2, 10)
    assert (echo["calling_ae"], echo["instances"], echo["outcome"]) == (
        "ECHOSCU", 0, "released")
    assert store["calling_ae"] == "STORESCU"
    assert store["address"] == "127.0.0.1"
    assert (store["instances"], store["refused"], store["outcome"]) == (3, 0, "released")
    assert store["bytes"] == sum(p.stat().st_size
                                 for p in (guarded_node.folder / "spool").rglob("*.dcm"))
    assert len(guarded_node.status()["study_list"]) == 1


@pytest.mark.peers
def test_refused_instances_are_counted_in_the_audit(tmp_path: Path,
                                                     untrained_bundle: Path) -> None:
    node = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=3600)
    node.start()
    try:
        files = factory.write_study(tmp_path / "study", 2)
        ds = factory.xray("1.2.3")
        del ds.StudyInstanceUID
        bad = tmp_path / "nostudy.dcm"
        ds.save_as(bad, enforce_file_format=True)
        proc = storescu(node.port, [*files, bad])
        assert sorted(c_store_statuses(proc.stdout + proc.stderr)) == [0, 0, 0xA900]
        (event,) = wait_for("association.ended", lambda: node.events("association.ended"), 10)
        assert (event["instances"], event["refused"]) == (2, 1)
        assert node.events("access.open")  # allow_any = true: said at start-up
    finally:
        node.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("pki"))


def tls_section(pki: Certificates, client_ca: bool = True) -> str:
    return ("[tls]\nenabled = true\n"
            f'certificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
            + (f'client_ca = "{pki.ca}"\n' if client_ca else ""))


@pytest.fixture
def tls_node(tmp_path: Path, untrained_bundle: Path, pki: Certificates):
    proc = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=3600,
                       sections=tls_section(pki))
    proc.start()
    yield proc
    proc.stop()


def tls_options(pki: Certificates, client_certificate: bool = True) -> list[str]:
    identity = (["+tls", str(pki.client_key), str(pki.client_cert)] if client_certificate
                else ["+tla"])
    return [*identity, "+cf", str(pki.ca)]


@pytest.mark.peers
def test_storescu_over_tls_with_a_client_certificate_is_stored(
        tls_node: NodeProcess, pki: Certificates, tmp_path: Path) -> None:
    files = factory.write_study(tmp_path / "study", 2)
    proc = storescu(tls_node.port, files, extra=tls_options(pki))
    assert c_store_statuses(proc.stdout + proc.stderr) == [0, 0], proc.stdout + proc.stderr
    assert len(list((tls_node.folder / "spool").rglob("*.dcm"))) == 2
    assert tls_node.events("node.started")[0]["tls"] is True


@pytest.mark.peers
def test_plain_client_and_client_without_certificate_are_refused(
        tls_node: NodeProcess, pki: Certificates, tmp_path: Path) -> None:
    files = factory.write_study(tmp_path / "study", 1)
    plain = storescu(tls_node.port, files)
    assert plain.returncode != 0 and c_store_statuses(plain.stdout + plain.stderr) == []
    anonymous = storescu(tls_node.port, files, extra=tls_options(pki, False))
    assert anonymous.returncode != 0
    assert c_store_statuses(anonymous.stdout + anonymous.stderr) == []
    events = rejections(tls_node, 2)
    assert {e["reason"] for e in events} == {"tls_handshake_failed"}
    assert not list((tls_node.folder / "spool").rglob("*.dcm"))
    # ... and the node still serves a proper client.
    proc = storescu(tls_node.port, files, extra=tls_options(pki))
    assert c_store_statuses(proc.stdout + proc.stderr) == [0]


@pytest.mark.peers
def test_a_client_certificate_is_bound_to_its_peer_entry(
        tmp_path: Path, untrained_bundle: Path, pki: Certificates) -> None:
    """Any certificate the CA signed used to do for any AE title its holder claimed:
    with certificate_cn, STORESCU must present the client certificate it was given,
    and ECHOSCU, bound to another holder's, is refused with that one."""
    peers = ('[[access.peers]]\nae_title = "STORESCU"\naddresses = ["127.0.0.1"]\n'
             'certificate_cn = "fractured test client"\n'
             '[[access.peers]]\nae_title = "ECHOSCU"\naddresses = ["127.0.0.1"]\n'
             'certificate_cn = "fractured test modality"\n')
    node = NodeProcess(tmp_path / "node", untrained_bundle, [], quiet_period_s=3600,
                       access="", sections=tls_section(pki) + peers).start()
    try:
        files = factory.write_study(tmp_path / "study", 1)
        stored = storescu(node.port, files, extra=tls_options(pki))
        assert c_store_statuses(stored.stdout + stored.stderr) == [0]
        echoed = echoscu(node.port, extra=tls_options(pki))
        assert echoed.returncode != 0
        assert "Calling AE Title Not Recognized" in echoed.stdout + echoed.stderr
        (event,) = rejections(node, 1)
        assert (event["reason"], event["calling_ae"]) == ("certificate_not_allowed",
                                                          "ECHOSCU")
    finally:
        node.stop()


def test_a_certificate_binding_needs_client_certificates() -> None:
    with pytest.raises(config.ConfigError, match=r"certificate_cn: needs client "
                       r"certificates: set \[tls\].client_ca"):
        policy('[[access.peers]]\nae_title = "A"\naddresses = ["::1"]\n'
               'certificate_cn = "a"')


@pytest.mark.peers
def test_a_silent_connection_does_not_hold_up_other_peers(
        tls_node: NodeProcess, pki: Certificates, tmp_path: Path) -> None:
    """The handshake runs in the association's thread: a client that connects and sends
    nothing must not stop the accept loop (pynetdicom handshakes there, unbounded)."""
    files = factory.write_study(tmp_path / "study", 1)
    with socket.create_connection(("127.0.0.1", tls_node.port)):
        proc = storescu(tls_node.port, files, extra=[*tls_options(pki), "-to", "20"])
    assert c_store_statuses(proc.stdout + proc.stderr) == [0]


@pytest.mark.peers
def test_key_that_does_not_match_its_certificate_stops_serve(
        tmp_path: Path, untrained_bundle: Path, pki: Certificates) -> None:
    node = NodeProcess(tmp_path / "node", untrained_bundle, [],
                       sections=tls_section(pki).replace(str(pki.server_key),
                                                         str(pki.client_key)))
    node.folder.mkdir(parents=True)
    node.write_config()
    proc = subprocess.run([sys.executable, "-m", "fractured", "serve", "--config",
                           str(node.config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "[tls].certificate / [tls].private_key: cannot be used together" in proc.stderr
