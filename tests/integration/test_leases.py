"""Claims kept alive while their work goes on (daemon.leases): a study analysed for longer
than its lease and deliveries to a PACS slow to answer stay with the node doing them,
on the real clock; two nodes sharing PostgreSQL send each result to a slow DCMTK
storescp once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from fractured.config import Destination, NodeSettings, Settings, WorkerSettings
from fractured.daemon.connection import make_engine
from fractured.daemon.leases import Renewal
from fractured.daemon.metrics import NodeMetrics
from fractured.daemon.queue import Queue, ResultObject
from fractured.daemon.schema import Delivery
from fractured.daemon.sender import deliver_due
from fractured.daemon.states import StudyState
from tests.factory import write_study
from tests.peers import Storescp, wait_for
from tests.postgres import PostgresCluster
from tests.unit.test_queue import received, state

pytestmark = pytest.mark.peers


def test_a_renewed_study_outlives_its_lease_and_an_unrenewed_one_does_not(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    node, other = Queue(make_engine(url)), Queue(make_engine(url))
    for study in ("1.1", "1.2"):
        node.intake.record_instance(received(f"{study}.1", study))
    node.mark_ready(0)
    renewed, left = node.claim("w1", lease_s=0.6), node.claim("w1", lease_s=0.6)
    assert renewed is not None and left is not None
    with Renewal(lambda: node.renew_study(renewed, "w1", 0.6), 0.6):
        time.sleep(1.5)  # two and a half leases of work
        taken = other.claim("w2", lease_s=60)
    assert taken is not None and taken.study_instance_uid == left.study_instance_uid
    assert other.claim("w2", lease_s=60) is None  # the renewed one stayed with w1
    assert node.finish(renewed, "w1", [], []) == StudyState.DONE
    assert node.finish(left, "w1", [], []) is None  # taken over: w2's run counts
    node.close()
    other.close()


def test_a_failed_renewal_is_logged_and_tried_again() -> None:
    calls: list[int] = []
    again = threading.Event()

    def renew() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("database restarting")
        again.set()
        return True

    with capture_logs() as logs, Renewal(renew, 0.3, study_instance_uid="1.2.3"):
        assert again.wait(10)
    assert [(e["event"], e["error"], e["study_instance_uid"]) for e in logs] == [
        ("lease.renewal_failed", "database restarting", "1.2.3")]


def test_two_nodes_send_each_result_to_a_slow_pacs_once(tmp_path: Path,
                                                        postgres: PostgresCluster) -> None:
    """A PACS that answers each C-STORE after 2 s, four results, a lease of 3 s: the node
    sending them holds them for 8 s by renewing, so the other node, looking every
    half second once the first has claimed them, never sends them too."""
    pacs = Storescp(tmp_path / "pacs", options=("--sleep-after", "2")).start()
    url = postgres.new_database()
    settings = Settings(node=NodeSettings(network_timeout_s=30),
                        worker=WorkerSettings(lease_s=3.0),
                        destinations=[Destination("pacs", pacs.ae_title, "127.0.0.1",
                                                  pacs.port)])
    sender, other = Queue(make_engine(url)), Queue(make_engine(url))
    sender.intake.record_instance(received("7.1", "7"))
    sender.mark_ready(0)
    claim = sender.claim("w1", 60)
    assert claim is not None
    files = write_study(tmp_path / "results", 4)
    sender.finish(claim, "w1", [ResultObject(f"9.{i}", "1.2", path)
                                for i, path in enumerate(files)], ["pacs"])
    metrics = {name: NodeMetrics() for name in ("n1", "n2")}
    sending = threading.Thread(target=deliver_due,
                               args=(sender, settings, metrics["n1"], "n1"))
    try:
        with capture_logs() as logs:
            sending.start()
            # which node claims first is a race; the test is of the one that did not
            wait_for("n1 to claim the deliveries", lambda: claimed_by(sender) == {"n1"},
                     10, 0.02)
            looked = 0
            while sending.is_alive():
                looked += 1
                deliver_due(other, settings, metrics["n2"], "n2")
                time.sleep(0.5)
            sending.join()
    finally:
        pacs.stop()
    assert pacs.store_requests() == 4 and len(pacs.files()) == 4
    assert looked >= 5  # the other node looked all through the 8 s
    assert state(sender, "7") == "done"
    assert sorted(e["event"] for e in logs if e["event"].startswith("delivery.")) == [
        "delivery.sent"] * 4
    sender.close()
    other.close()


def claimed_by(queue: Queue) -> set[str | None]:
    """The workers named on the queue's deliveries."""
    with queue.engine.connect() as connection:
        return set(connection.scalars(select(Delivery.claimed_by)))
