"""Start and stop the whole node: database, engine, scheduler, DICOM listener, signals."""

from __future__ import annotations

import signal
import threading

from pynetdicom.transport import ThreadedAssociationServer

from fractured import log
from fractured.config import Settings
from fractured.daemon import scp
from fractured.daemon.queue import Queue, make_engine
from fractured.daemon.scheduler import build_scheduler
from fractured.daemon.spool import ensure_dir
from fractured.daemon.worker import Worker
from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline

_log = log.get("fractured.service")


class Node:
    """One running node. Loading happens in __init__, so a bad bundle or database
    fails before the listener opens and the PACS never sees a half-working node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        ensure_dir(settings.node.spool_dir)
        self.queue = Queue(make_engine(settings.database.url))
        bundle = Bundle.load(settings.engine.bundle)
        self.pipeline = Pipeline(bundle, backend=settings.engine.backend,
                                 max_batch=settings.engine.max_batch,
                                 threads=settings.engine.threads or None)
        self.worker = Worker(settings, self.queue, self.pipeline)
        self._stop = threading.Event()
        self.scheduler = build_scheduler(settings, self.queue, self.worker, self._stop)
        self.ae = scp.build_ae(settings)
        self._server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        released = self.queue.release_leases(self.worker.id)
        if released:
            _log.info("leases.released", studies=released, worker=self.worker.id)
        self.scheduler.start()
        self._server = self.ae.start_server(
            (self.settings.node.host, self.settings.node.port), block=False,
            evt_handlers=scp.handlers(self.settings.node.spool_dir, self.queue))
        model = self.pipeline.model
        _log.info("node.started", ae_title=self.settings.node.ae_title,
                  host=self.settings.node.host, port=self.settings.node.port,
                  model=model.label, trained=model.trained, backend=self.pipeline.backend_name,
                  destinations=[d.name for d in self.settings.destinations])
        if not model.trained:
            _log.warning("model.untrained", model=model.label,
                         detail="results are marked UNTRAINED MODEL and mean nothing")

    def stop(self) -> None:
        """Close the listener first (no new objects), then let running jobs finish."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        self.scheduler.shutdown(wait=True)
        self.queue.engine.dispose()
        _log.info("node.stopped")

    def run_until_signalled(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        self._stop.wait()
        self.stop()
