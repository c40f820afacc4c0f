"""Fault loop: studies sent with DCMTK storescu while the node is killed (SIGKILL) at
random moments — while images arrive, in the quiet period, or while the study is
analysed and its results sent — then restarted.

After each restart it checks what the node promised: every instance storescu got a
success status for is in the database and on disk (readable, the right UID); the rest
is resent; no temporary file of an interrupted write is left in the spool (the start-up
scan removes them, and records any spooled file whose row is missing: counted); and in
the end each study is done and its results reached the destination
exactly once (one SR per study, one overlay per image, at DCMTK storescp).

    .venv/bin/python -m bench.faults [--cycles 100] [--instances 100] [--seed 0]

tests/integration/test_faults.py runs a few cycles of the same loop.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sqlite3
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from fractured.training.build import build_untrained_bundle
from tests.factory import write_study
from tests.peers import NodeProcess, Sender, Storescp, c_store_statuses, wait_for

#: The node's quiet period in the loop: long enough for the resend after a restart to
#: come within it (a restart starts the quiet period of a study still receiving again).
QUIET_PERIOD_S = 3.0
#: Where a cycle's kill is aimed, drawn evenly; the moment within it is drawn too.
PHASES = ("receiving", "quiet_period", "processing")


@dataclass
class FaultLoopCounts:
    """What the loop saw; `lost` and the delivery mismatches must all be zero."""

    cycles: int = 0
    sent: int = 0
    acknowledged_before_kill: int = 0
    held_after_restart: int = 0
    lost: list[str] = field(default_factory=list)
    recorded_from_spool: int = 0  # files without a row at a restart (daemon.recovery)
    temporary_left: int = 0  # interrupted writes still in the spool after a restart
    kills: Counter[str] = field(default_factory=Counter)  # where each kill landed
    studies: int = 0
    sr_per_study: Counter[int] = field(default_factory=Counter)
    overlay_mismatches: list[str] = field(default_factory=list)

    def report(self) -> str:
        return (f"cycles {self.cycles}: kills while {dict(self.kills)}; "
                f"{self.sent} instances sent, {self.acknowledged_before_kill} acknowledged "
                f"before a kill, {self.held_after_restart} of them held after the restart, "
                f"lost {len(self.lost)}; {self.recorded_from_spool} recorded again from the "
                f"spool at a restart, {self.temporary_left} interrupted writes left; "
                f"{self.studies} studies done, SRs per study "
                f"{dict(self.sr_per_study)}, overlay mismatches {len(self.overlay_mismatches)}")


def held_instances(node: NodeProcess) -> dict[str, Path]:
    """SOP Instance UID -> spool path, read from the node's database directly."""
    with sqlite3.connect(f"file:{node.folder / 'fractured.db'}?mode=ro", uri=True) as db:
        return {uid: Path(path) for uid, path in db.execute(
            "SELECT sop_instance_uid, path FROM instances")}


def held_count(node: NodeProcess, study_uid: str) -> int:
    with sqlite3.connect(f"file:{node.folder / 'fractured.db'}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM instances JOIN studies ON studies.id = "
                          "instances.study_id WHERE study_instance_uid = ?",
                          (study_uid,)).fetchone()[0]


def study_states(node: NodeProcess) -> dict[str, str]:
    with sqlite3.connect(f"file:{node.folder / 'fractured.db'}?mode=ro", uri=True) as db:
        return {uid: state.lower() for uid, state in db.execute(
            "SELECT study_instance_uid, state FROM studies")}


def acknowledged(files: list[Path], output: str) -> list[Path]:
    """The files storescu got a success status for (it sends them in order)."""
    return [f for f, status in zip(files, c_store_statuses(output), strict=False)
            if status == 0]


def fault_loop(work: Path, bundle: Path, cycles: int, instances: int, seed: int = 0,
               log: bool = False) -> FaultLoopCounts:
    rng = random.Random(seed)
    counts = FaultLoopCounts()
    destination = Storescp(work / "destination").start()
    node = NodeProcess(work / "node", bundle, [{"name": "dest", "ae_title": destination.ae_title,
                                               "port": destination.port}],
                       quiet_period_s=QUIET_PERIOD_S)
    studies: dict[str, list[Path]] = {}
    try:
        for cycle in range(cycles):
            files = write_study(work / f"study{cycle:03d}", instances, rows=64, cols=64)
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
            studies[uid] = files
            node.start()
            sender = Sender(node.port, files, work / "storescu.log")
            wait_for_kill_point(node, sender, uid, rng, instances)
            phase = kill_phase(node, sender, uid)
            counts.kills[phase] += 1
            node.stop(signal.SIGKILL)
            output = sender.output()
            got = acknowledged(files, output)
            counts.sent += len(files)
            counts.acknowledged_before_kill += len(got)

            node.start()
            counts.recorded_from_spool += node.wait_events(
                "spool.checked", 2 * cycle + 2)[-1]["recorded"]
            counts.temporary_left += sum(
                1 for _ in (node.folder / node.spool_dir).rglob(".*.tmp"))
            held = held_instances(node)
            for path in got:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                spooled = held.get(str(ds.SOPInstanceUID))
                if spooled is None or not spooled.is_file() or str(pydicom.dcmread(
                        spooled, stop_before_pixels=True).SOPInstanceUID) != ds.SOPInstanceUID:
                    counts.lost.append(str(ds.SOPInstanceUID))
                else:
                    counts.held_after_restart += 1
            rest = [f for f in files if f not in got]
            if rest:
                resend = Sender(node.port, rest, work / "storescu.log")
                statuses = c_store_statuses(resend.output())
                if statuses != [0] * len(rest):
                    raise SystemExit(f"cycle {cycle}: resend answered {statuses[:5]}...")
            try:
                wait_for(f"study {uid} to be done",
                         lambda u=uid: study_states(node).get(u) == "done", 120)
            except BaseException:
                print(f"cycle {cycle + 1}: killed while {phase}; study {uid} is "
                      f"{study_states(node).get(uid)}", flush=True)
                raise
            node.stop()
            counts.cycles += 1
            if log:
                print(f"  cycle {cycle + 1}/{cycles}: killed while {phase}, "
                      f"{len(got)}/{len(files)} acknowledged before, lost so far "
                      f"{len(counts.lost)}", flush=True)
        check_deliveries(counts, destination, studies)
    finally:
        node.stop()
        destination.stop()
    return counts


def wait_for_kill_point(node: NodeProcess, sender: Sender, study_uid: str,
                        rng: random.Random, instances: int) -> None:
    """Wait until a randomly drawn moment of a randomly drawn phase of the study."""
    phase = rng.choice(PHASES)
    deadline = time.monotonic() + 60
    if phase == "receiving":  # after a random number of stored instances
        target = rng.randint(1, max(1, instances - 1))
        while sender.running() and held_count(node, study_uid) < target:
            time.sleep(0.005)
    elif phase == "quiet_period":
        while sender.running() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.8 * QUIET_PERIOD_S))
    else:  # processing: analysis, writing results, delivering them
        while study_states(node).get(study_uid) not in ("processing", "delivering", "done") \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))


def kill_phase(node: NodeProcess, sender: Sender, study_uid: str) -> str:
    """Where the node is about to be killed (best effort: read just before the kill)."""
    if sender.running():
        return "receiving"
    state = study_states(node).get(study_uid, "receiving")
    return {"receiving": "quiet_period", "ready": "quiet_period"}.get(state, state)


def check_deliveries(counts: FaultLoopCounts, destination: Storescp,
                     studies: dict[str, list[Path]]) -> None:
    received: dict[str, Counter[str]] = {uid: Counter() for uid in studies}
    for path in destination.files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        received.setdefault(str(ds.StudyInstanceUID), Counter())[str(ds.Modality)] += 1
    for uid, files in studies.items():
        kinds = received[uid]
        counts.studies += 1
        counts.sr_per_study[kinds["SR"]] += 1
        if sum(kinds.values()) - kinds["SR"] != len(files):  # one overlay per image
            counts.overlay_mismatches.append(f"{uid}: {dict(kinds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--instances", type=int, default=100, help="per study")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Kept when the loop fails: the node's log, database and spool are the evidence.
    work = Path(tempfile.mkdtemp(prefix="fractured-faults-"))
    try:
        bundle = build_untrained_bundle(work / "bundle", input_size=128)
        counts = fault_loop(work, bundle, args.cycles, args.instances, args.seed, log=True)
    except BaseException:
        print(f"the loop stopped: its node log, database and spool are kept in {work}")
        raise
    shutil.rmtree(work)
    print(counts.report())
    if (counts.lost or counts.temporary_left or counts.overlay_mismatches
            or set(counts.sr_per_study) != {1}):
        raise SystemExit("FAILED: " + counts.report())


if __name__ == "__main__":
    main()
