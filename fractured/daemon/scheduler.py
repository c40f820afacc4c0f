"""APScheduler jobs that move studies along: quiet-period sweep, worker, deliveries;
and retention, which removes what finished studies leave behind.

Each job runs at most once at a time (max_instances=1) and catches its own errors, so
one bad study or an unreachable PACS never stops the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from apscheduler.schedulers.background import BackgroundScheduler

from fractured import log
from fractured.config import Settings
from fractured.daemon import retention
from fractured.daemon.metrics import NodeMetrics
from fractured.daemon.queue import Queue
from fractured.daemon.schema import utcnow
from fractured.daemon.sender import deliver_due
from fractured.daemon.worker import Worker

#: How often the quiet-period sweep and the delivery job look for work, in seconds.
SWEEP_INTERVAL_S = 1.0
DELIVERY_INTERVAL_S = 1.0

_log = log.get("fractured.scheduler")


def build_scheduler(settings: Settings, queue: Queue, worker: Worker,
                    stopping: threading.Event, metrics: NodeMetrics) -> BackgroundScheduler:
    """The node's jobs; `stopping` ends the worker's drain loop between studies."""
    scheduler = BackgroundScheduler(timezone="UTC")

    def sweep() -> None:
        for uid in queue.mark_ready(settings.study.quiet_period_s):
            _log.info("study.ready", study_instance_uid=uid)

    def work() -> None:
        # Drain the ready studies, then wait for the next tick; stop between studies.
        while not stopping.is_set() and worker.run_once():
            pass

    def deliver() -> None:
        deliver_due(queue, settings, metrics, worker.id)

    def purge() -> None:
        retention.apply(queue, retention.plan(queue, settings, utcnow()))

    jobs: list[tuple[str, Callable[[], None], float]] = [
        ("sweep", sweep, SWEEP_INTERVAL_S),
        ("work", work, settings.worker.poll_interval_s),
        ("deliver", deliver, DELIVERY_INTERVAL_S),
        ("retention", purge, settings.retention.interval_s),
    ]
    for name, fn, every in jobs:
        scheduler.add_job(_guarded(name, fn), "interval", seconds=every, id=name,
                          max_instances=1, coalesce=True)
    return scheduler


def _guarded(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            fn()
        except Exception as exc:
            _log.exception("job.failed", job=name, error=str(exc))
    run.__name__ = name
    return run
