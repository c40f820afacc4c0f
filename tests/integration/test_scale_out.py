"""Scale-out: two node processes sharing one PostgreSQL database and one spool.

Studies arrive at both nodes from parallel storescu runs, as behind a DICOM load
balancer; each is processed exactly once (one SR per study at the destination), and a
node killed (SIGKILL) while it processes a study leaves it to the other, which takes it
over once the lease has run out.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from fractured.daemon import reports
from fractured.daemon.connection import make_engine
from fractured.daemon.queue import Queue
from fractured.daemon.schema import Delivery, Study
from fractured.daemon.states import StudyState
from tests.factory import write_study
from tests.peers import NodeProcess, Sender, Storescp, c_store_statuses, wait_for
from tests.postgres import PostgresCluster

pytestmark = [pytest.mark.peers, pytest.mark.slow]

STUDIES = 20
IMAGES = 2
#: Short, so that the takeover comes soon after the kill; long enough that a live node
#: keeps its lease through a study on a busy machine.
LEASE_S = 8.0


def held_by(queue: Queue, port: int) -> list[str]:
    """The studies a node (by the port in its worker id) is processing now."""
    with queue.engine.connect() as db:
        return list(db.scalars(select(Study.study_instance_uid).where(
            Study.state == StudyState.PROCESSING, Study.claimed_by.endswith(f":{port}"))))


def kill_while_processing(node: NodeProcess, queue: Queue) -> str:
    """SIGKILL `node` while it holds a study: it is frozen (SIGSTOP) at each of its
    claims until one is caught still processing. Returns that study's UID."""
    assert node.proc is not None
    deadline = time.monotonic() + 180
    claims = 1
    while time.monotonic() < deadline:
        node.wait_events("study.claimed", claims, timeout=180)
        os.kill(node.proc.pid, signal.SIGSTOP)
        held = held_by(queue, node.port)
        if held:
            node.stop(signal.SIGKILL)
            return held[0]
        os.kill(node.proc.pid, signal.SIGCONT)  # it had finished that one already
        claims = len(node.events("study.claimed")) + 1
    pytest.fail("the node was never caught processing a study")


def test_two_nodes_process_each_study_once_and_take_over_a_dead_ones(
        tmp_path: Path, untrained_bundle: Path, postgres: PostgresCluster) -> None:
    url = postgres.new_database()
    destination = Storescp(tmp_path / "destination").start()
    spool = tmp_path / "shared-spool"  # one absolute path, as a shared mount gives
    nodes = [NodeProcess(tmp_path / name, untrained_bundle,
                         [{"name": "dest", "ae_title": destination.ae_title,
                           "port": destination.port}],
                         quiet_period_s=3.0, spool_dir=str(spool), database_url=url,
                         worker=f"lease_s = {LEASE_S}")
             for name in ("a", "b")]
    survivor, victim = nodes
    queue = Queue(make_engine(url))
    try:
        with ThreadPoolExecutor(2) as pool:  # both create the tables at the same moment
            list(pool.map(NodeProcess.start, nodes))
        studies = {}
        for i in range(STUDIES):
            files = write_study(tmp_path / f"study{i:02d}", IMAGES, rows=64, cols=64)
            studies[str(pydicom.dcmread(files[0]).StudyInstanceUID)] = files
        batches = [list(studies.values())[i::4] for i in range(4)]
        senders = [Sender(nodes[i % 2].port, [f for study in batch for f in study],
                          tmp_path / f"storescu{i}.log") for i, batch in enumerate(batches)]
        for sender in senders:
            assert c_store_statuses(sender.output()) == [0] * (STUDIES // 4 * IMAGES)
        assert {len(n.events("store.accepted")) for n in nodes} == {STUDIES // 2 * IMAGES}

        taken_over = kill_while_processing(victim, queue)
        wait_for(f"all {STUDIES} studies to be done", lambda: [
            s["state"] for s in reports.studies(queue.engine)] == ["done"] * STUDIES, 300,
                 every=1.0)

        received: dict[str, Counter[str]] = {uid: Counter() for uid in studies}
        for path in destination.files():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            kind = "sr" if ds.Modality == "SR" else "overlay"
            received[str(ds.StudyInstanceUID)][kind] += 1
        assert {uid: dict(kinds) for uid, kinds in received.items()} == {
            uid: {"sr": 1, "overlay": IMAGES} for uid in studies}
        # No node sent another's delivery: each was sent successfully once, and every
        # attempt recorded is one a node logged. (An attempt may fail and be retried: a
        # loaded machine meets pynetdicom's race that takes a C-STORE response for a
        # request, pynetdicom #435, and the send waits out the DIMSE timeout.)
        with queue.engine.connect() as db:
            attempts = sum(db.scalars(select(Delivery.attempts)))
        sent = [e for n in nodes for e in n.events("delivery.sent")]
        failed = [e for n in nodes for e in n.events("delivery.failed")]
        assert len(sent) == STUDIES * (1 + IMAGES)
        assert attempts == len(sent) + len(failed)
        processed = Counter(e["study_instance_uid"] for n in nodes
                            for e in n.events("study.processed"))
        assert processed == Counter(dict.fromkeys(studies, 1))
        assert {(e["study_instance_uid"], e["run"]) for e in survivor.events("study.claimed")
                if e["study_instance_uid"] == taken_over} == {(taken_over, 2)}

        victim.start()  # its start-up check finds every file of the shared spool recorded
        checked = victim.wait_events("spool.checked", 2)[-1]
        assert (checked["files"], checked["recorded"], checked["unrecoverable"]) == (
            STUDIES * IMAGES, 0, 0)
    finally:
        for node in nodes:
            node.stop()
        destination.stop()
        queue.close()
