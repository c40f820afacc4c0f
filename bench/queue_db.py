"""Queue database cost as the node's history grows: per received instance and per study.

The database is filled (in bulk, outside the measurement) to 1,000, 10,000 and 100,000
instances held (10 per study, studies done, results delivered), then the node's own
calls are timed on new studies:

- per instance: `held` (the duplicate check, which the listener makes only when the
  image's file is already spooled: a resend) and `record_instance`;
- per study: `mark_ready`, `claim`, `finish` (two result objects, one destination),
  `take_due_deliveries` and `record_attempt` for each result, as scheduler, worker and
  sender make them.

The listener's commits are not fsynced (queue.INTAKE_SYNCHRONOUS), the others are
(synchronous=FULL), a constant cost; what must not grow is the rest. Every statement
those calls ran is also checked with EXPLAIN QUERY PLAN, and any full table scan is
printed. The start-up spool check (daemon.recovery) reads every recorded path once, by
design: its time is printed too.

    .venv/bin/python -m bench.queue_db [--sizes 1000 10000 100000] [--studies 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import event, insert

from fractured.daemon.connection import make_engine
from fractured.daemon.intake import ReceivedInstance
from fractured.daemon.queue import Queue, ResultObject
from fractured.daemon.schema import Delivery, Instance, Study, utcnow
from fractured.daemon.states import DeliveryState, StudyState

PER_STUDY = 10


def fill(queue: Queue, instances: int) -> None:
    """`instances` held in done studies of PER_STUDY each, with delivered results."""
    now = utcnow() - timedelta(days=1)
    studies = instances // PER_STUDY
    with queue.engine.begin() as db:
        db.execute(insert(Study), [
            {"id": s + 1, "study_instance_uid": f"1.2.9.{s}", "state": StudyState.DONE,
             "first_received_at": now, "last_received_at": now, "runs": 1,
             "processed_at": now} for s in range(studies)])
        db.execute(insert(Instance), [
            {"study_id": i // PER_STUDY + 1, "sop_instance_uid": f"1.2.9.{i // PER_STUDY}.{i}",
             "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1", "series_instance_uid": "1.2.8",
             "modality": "DX", "path": f"/spool/{i}.dcm", "size": 131_000,
             "calling_ae": "PACS", "received_at": now} for i in range(studies * PER_STUDY)])
        db.execute(insert(Delivery), [
            {"study_id": s + 1, "run": 1, "destination": "pacs",
             "sop_instance_uid": f"1.2.7.{s}.{k}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
             "path": f"/results/{s}-{k}.dcm", "state": DeliveryState.DONE, "attempts": 1,
             "next_attempt_at": now, "last_status": 0, "done_at": now}
            for s in range(studies) for k in range(2)])


def per_instance(queue: Queue, studies: int, tag: str) -> float:
    """Seconds per received instance (held + record_instance)."""
    start = time.perf_counter()
    for s in range(studies):
        for i in range(PER_STUDY):
            uid = f"1.3.{tag}.{s}.{i}"
            held = queue.intake.held(uid)
            queue.intake.record_instance(ReceivedInstance(
                study_instance_uid=f"1.3.{tag}.{s}", series_instance_uid="1.3.8",
                sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                modality="DX", path=Path(f"/spool/{uid}.dcm"), size=131_000,
                calling_ae="PACS"), unheld=held is None)
    return (time.perf_counter() - start) / (studies * PER_STUDY)


def per_study(queue: Queue, studies: int, tag: str) -> float:
    """Seconds per study from ready to delivered (scheduler, worker, sender calls)."""
    start = time.perf_counter()
    queue.mark_ready(0)
    for s in range(studies):
        claim = queue.claim("bench", 300)
        if claim is None:
            raise SystemExit("a ready study was not claimed")
        results = [ResultObject(f"1.4.{tag}.{s}.{k}", "1.2.840.10008.5.1.4.1.1.7",
                                Path(f"/results/{tag}-{s}-{k}.dcm")) for k in range(2)]
        queue.finish(claim, "bench", results, ["pacs"])
        for item in queue.take_due_deliveries("bench", 300):
            queue.record_attempt(item, status=0, error=None, retry_in_s=0, max_attempts=3)
    return (time.perf_counter() - start) / studies


class ScanWatch:
    """Collects the statements run on an engine and reports their full table scans."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.statements: dict[str, tuple] = {}
        for engine in {queue.engine, queue.intake.engine}:  # the listener's pool and the rest
            event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn, _cursor, statement, parameters, _context, executemany) -> None:  # type: ignore[no-untyped-def]
        if not executemany and statement.lstrip().upper().startswith(("SELECT", "UPDATE")):
            self.statements.setdefault(statement, parameters)

    def scans(self) -> list[str]:
        out = []
        raw = self.queue.engine.raw_connection()
        try:
            cursor = raw.cursor()
            for statement, parameters in self.statements.items():
                for row in cursor.execute(f"EXPLAIN QUERY PLAN {statement}", parameters):
                    detail = str(row[-1])
                    if detail.startswith("SCAN ") and "USING" not in detail:
                        out.append(f"{detail}  <-  {' '.join(statement.split())[:140]}")
        finally:
            raw.close()
        return sorted(set(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--studies", type=int, default=20, help="measured per size")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            queue = Queue(make_engine(f"sqlite:///{tmp}/queue-{size}.db"))
            fill(queue, size)
            watch = ScanWatch(queue)
            instance_s = per_instance(queue, args.studies, str(size))
            study_s = per_study(queue, args.studies, str(size))
            results.append((size, instance_s, study_s))
            print(f"{size:>7} instances held: {instance_s * 1e3:6.2f} ms per received instance, "
                  f"{study_s * 1e3:6.2f} ms per study (ready -> delivered)")
            for scan in watch.scans():
                print(f"          full scan: {scan}")
            start = time.perf_counter()  # the start-up spool check reads every path, once
            paths = queue.intake.recorded_paths()
            print(f"          start-up spool check: {len(paths)} recorded paths read in "
                  f"{(time.perf_counter() - start) * 1e3:.0f} ms")
            queue.close()
    (small, i0, s0), (large, i1, s1) = results[0], results[-1]
    print(f"{large} vs {small} held: {i1 / i0:.2f}x per instance, {s1 / s0:.2f}x per study "
          "(flat: about 1x)")


if __name__ == "__main__":
    main()
