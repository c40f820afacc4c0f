"""Start and stop the whole node: database, engine, scheduler, DICOM listener, monitoring
endpoint, signals, and the systemd notifications (ready, stopping, watchdog) of a
Type=notify service."""

from __future__ import annotations

import signal
import threading
import time

from fractured import log
from fractured.config import Settings
from fractured.daemon import limits, liveness, recovery, scp, systemd, tls
from fractured.daemon.access import AccessPolicy
from fractured.daemon.active_model import ActiveModel
from fractured.daemon.audit import AssociationAudit
from fractured.daemon.connection import make_engine
from fractured.daemon.health import HealthChecks
from fractured.daemon.metrics import NodeMetrics
from fractured.daemon.monitoring import MonitoringServer
from fractured.daemon.queue import Queue
from fractured.daemon.scheduler import build_scheduler
from fractured.daemon.worker import Worker
from fractured.durable import ensure_dir
from fractured.engine.pipeline import Pipeline

#: How often the main thread wakes to notice a stop signal, in seconds.
SIGNAL_POLL_S = 0.5
#: How often the scheduler's heartbeat job runs, in seconds (daemon.liveness).
HEARTBEAT_INTERVAL_S = 1.0

_log = log.get("fractured.service")


class Node:
    """One running node. Loading happens in __init__, so a bad bundle or database
    fails before the listener opens and the PACS never sees a half-working node."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Before anything opens: a node nobody said who may reach refuses to start.
        self.access = AccessPolicy.from_settings(settings.access)
        ensure_dir(settings.node.spool_dir)
        self.queue = Queue(make_engine(settings.database.url))
        engine = settings.engine
        self.model = ActiveModel(engine.bundle, lambda bundle: Pipeline(
            bundle, backend=engine.backend, max_batch=engine.max_batch,
            threads=engine.threads or None, tta=engine.tta, boxes=engine.boxes,
            extra_body_parts=engine.extra_body_parts))
        self.metrics = NodeMetrics()
        self.metrics.watch(self.queue, self.model)
        self.worker = Worker(settings, self.queue, self.model, self.metrics)
        self._stop = threading.Event()
        self.scheduler = build_scheduler(settings, self.queue, self.worker, self._stop,
                                         self.metrics)
        self.ae = scp.build_ae(settings)
        self.ssl_context = tls.server_context(settings.tls)
        # Each destination's TLS files are read now too: a bad one stops the node here,
        # naming its key, rather than failing every delivery later.
        for destination in settings.destinations:
            tls.destination_context(destination)
        self._server: tls.HandshakingServer | None = None
        # Bound now (a port in use is a ConfigError before anything opens), served in start.
        self.monitoring = MonitoringServer(
            settings.metrics, self.metrics,
            HealthChecks(lambda: self._server, self.queue.engine.url, self.model),
        ) if settings.metrics.enabled else None
        self.notifier = systemd.Notifier.from_environ()
        self.heartbeats = liveness.Heartbeats(
            (liveness.MAIN_LOOP, liveness.SCHEDULER, liveness.LISTENER))
        self.scheduler.add_job(lambda: self.heartbeats.beat(liveness.SCHEDULER), "interval",
                               seconds=HEARTBEAT_INTERVAL_S, id="heartbeat",
                               max_instances=1, coalesce=True)
        self._watchdog: systemd.Watchdog | None = None

    def start(self) -> None:
        recovery.check_spool(self.settings.node.spool_dir, self.queue)
        released = self.queue.release_leases(self.worker.id)
        if released:
            _log.info("leases.released", studies=released, worker=self.worker.id)
        reopened = self.queue.restart_quiet_periods()
        if reopened:
            _log.info("quiet_periods.restarted", studies=reopened)
        self.worker.decoder.start()  # importing takes a second: not at the first study
        self.scheduler.start()
        self._server = tls.start_server(
            self.ae, (self.settings.node.host, self.settings.node.port), self.ssl_context,
            scp.handlers(self.settings.node, self.queue, self.access,
                         AssociationAudit(self.metrics), self.metrics), self.metrics,
            self.settings.node.max_connections_per_peer,
            on_turn=lambda: self.heartbeats.beat(liveness.LISTENER))
        if self.monitoring is not None:
            self.monitoring.start()
        pipeline = self.model.pipeline
        model = pipeline.model
        _log.info("node.started", ae_title=self.settings.node.ae_title,
                  host=self.settings.node.host, port=self.settings.node.port,
                  model=model.label, trained=model.trained, backend=pipeline.backend_name,
                  tls=self.ssl_context is not None,
                  client_certificates=self.settings.tls.client_ca is not None,
                  allowed_peers=sorted(self.access.peers),
                  engines=str(self.model.location),
                  destinations=[d.name for d in self.settings.destinations])
        if self.access.open:
            _log.warning("access.open", detail="[access].allow_any = true: any calling AE "
                         "from any address may store images here")
        if not model.trained:
            _log.warning("model.untrained", model=model.label,
                         detail="results are marked UNTRAINED MODEL and mean nothing")
        intended = pipeline.intended_use
        _log.info("model.intended_use", model=model.label,
                  body_parts=list(intended.body_parts) if intended else None,
                  min_age_years=intended.min_age_years if intended else None)
        if self.settings.engine.extra_body_parts:
            _log.warning("scope.widened", body_parts=self.settings.engine.extra_body_parts,
                         detail="[engine].extra_body_parts: the model speaks on body "
                         "parts it was not validated on")
        self.notifier.ready(f"serving as {self.settings.node.ae_title} on "
                            f"{self.settings.node.host}:{self.settings.node.port}, "
                            f"model {model.label} ({pipeline.backend_name})")
        self._start_watchdog()

    def _start_watchdog(self) -> None:
        """Ping systemd's watchdog while the node's loops turn, when the unit asks for it
        (WatchdogSec=)."""
        timeout_s = systemd.watchdog_timeout()
        if timeout_s is None or not self.notifier.enabled:
            return
        stale_after_s = max(timeout_s, liveness.STALE_AFTER_MIN_S)
        self.heartbeats.reset()
        self._watchdog = systemd.Watchdog(self.notifier, timeout_s,
                                          lambda: self.heartbeats.stale(stale_after_s))
        self._watchdog.start()

    def stop(self) -> None:
        """Close the listener (no new associations), let established associations finish
        within the grace period and abort the rest, then let running jobs finish.

        An association that never got past its request (a port probe, a half-open
        connection) would otherwise keep the process alive for the network timeout.
        """
        self._stop.set()
        self.notifier.stopping("stopping: letting associations finish")
        if self._watchdog is not None:
            self._watchdog.stop()
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + self.settings.node.shutdown_grace_s
        while time.monotonic() < deadline and any(
                a.is_established for a in self.ae.active_associations):
            time.sleep(0.1)
        for assoc in self.ae.active_associations:
            if assoc.is_established:
                _log.warning("association.aborted", reason="shutdown",
                             calling_ae=assoc.requestor.ae_title)
                assoc.abort()
            else:  # a connection that never sent a request: pynetdicom refuses an
                # A-ABORT there (Evt15 in Sta2); stop its thread, after closing the
                # connection under it, whose read of a PDU begun but never finished
                # (a byte, then nothing) would hold the thread for the network timeout
                limits.close_transport(assoc)
                assoc.kill()
        # A study being analysed is finished first; it may not take longer than its lease.
        self.notifier.extend_timeout(self.settings.worker.lease_s,
                                     "stopping: finishing the running study and deliveries")
        self.scheduler.shutdown(wait=True)
        self.worker.decoder.close()
        if self.monitoring is not None:
            self.monitoring.stop()
        self.queue.close()
        _log.info("node.stopped")

    def run_until_signalled(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        # Poll rather than wait for good: a process signal may be delivered to any thread
        # (ONNX Runtime's, pynetdicom's), and the main thread only runs the Python handler
        # once it wakes up.
        while not self._stop.wait(SIGNAL_POLL_S):
            self.heartbeats.beat(liveness.MAIN_LOOP)
        self.stop()
