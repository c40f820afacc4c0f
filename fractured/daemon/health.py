"""Is the node able to do its job right now: the DICOM listener, the database, the engine.

Each check looks at the real thing rather than at a flag the node set itself. The
listener: its accept thread is alive and its socket is listening. The database: a query
on a connection opened for the check alone, since the node's pooled connections keep
working on a SQLite file that was deleted or replaced under them (they hold the old
inode) while every new connection, the next start included, would not; opened
read-only, so a missing file is reported instead of being created empty; and the file
at the path must still be the one the node opened, since SQLite can answer a query on a
replaced file from the old one's write-ahead log beside it. The engine: a model is
loaded.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, literal, select
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import NullPool

from fractured import log
from fractured.daemon.active_model import ActiveModel
from fractured.daemon.schema import Study
from fractured.daemon.tls import HandshakingServer

OK = "ok"

_log = log.get("fractured.health")


@dataclass(frozen=True)
class HealthReport:
    """Each part's state: "ok", or what is wrong with it."""

    checks: dict[str, str]
    model: str = field(default="")

    @property
    def failing(self) -> list[str]:
        return [part for part, state in self.checks.items() if state != OK]

    @property
    def healthy(self) -> bool:
        return not self.failing

    def as_json(self) -> dict[str, object]:
        return {"status": "ok" if self.healthy else "failing", "failing": self.failing,
                "checks": self.checks, "model": self.model}


class HealthChecks:
    """The node's health, checked afresh on every call; a change is logged once."""

    def __init__(self, listener: Callable[[], HandshakingServer | None],
                 database: URL, model: ActiveModel) -> None:
        self._listener = listener
        self._database = DatabaseProbe(database)
        self._model = model
        self._lock = threading.Lock()
        self._failing: list[str] = []

    def check(self) -> HealthReport:
        report = HealthReport({"listener": listener_problem(self._listener()) or OK,
                               "database": self._database.problem() or OK,
                               "engine": self._engine_problem() or OK},
                              model=self._model.pipeline.model.label)
        with self._lock:
            changed, self._failing = report.failing != self._failing, report.failing
        if changed and report.healthy:
            _log.info("health.recovered")
        elif changed:
            _log.warning("health.failing", failing=report.failing,
                         **{part: report.checks[part] for part in report.failing})
        return report

    def _engine_problem(self) -> str:
        if self._model.pipeline.models.classifier is None:
            return "no classifier loaded"
        return ""


def listener_problem(server: HandshakingServer | None) -> str:
    """What stops the DICOM listener from taking connections, or ''."""
    if server is None:
        return "not started"
    if not server.thread.is_alive():
        return "accept thread not running"
    try:
        listening = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:  # closed: a stopped server
        return f"socket closed ({exc.strerror})"
    return "" if listening else "socket not listening"


class DatabaseProbe:
    """Reads the queue's database as a newcomer would; made when the node opens it, so
    a SQLite file's identity (device and inode) then is the one to expect."""

    def __init__(self, url: URL) -> None:
        database = url.database
        self.file = (Path(database).resolve() if url.get_backend_name() == "sqlite"
                     and database not in (None, "", ":memory:") else None)
        self._identity = None if self.file is None else _identity(self.file)
        self._engine = _probe_engine(url, self.file)

    def problem(self) -> str:
        """Why a fresh connection cannot read the studies table, or the node's file is
        no longer at its path; '' when neither."""
        try:
            with self._engine.connect() as conn:
                conn.execute(select(literal(1)).select_from(Study).limit(1)).all()
        except Exception as exc:  # any driver's error: the message is what an admin needs
            return _first_line(exc)
        if self.file is not None and _identity(self.file) != self._identity:
            return (f"{self.file} was replaced while the node runs: the node still writes "
                    "to the file it opened, which is no longer there")
        return ""


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _probe_engine(url: URL, file: Path | None) -> Engine:
    """An engine whose every connection is new (NullPool); a SQLite file is opened
    read-only (mode=ro), so a missing one is an error instead of a new empty database."""
    if file is not None:
        url = url.set(database=file.as_uri(), query={"mode": "ro", "uri": "true"})
        return create_engine(url, poolclass=NullPool, connect_args={"timeout": 5})
    return create_engine(url, poolclass=NullPool)


def _first_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's statement and background link."""
    cause = exc.__cause__ or exc
    return str(cause).splitlines()[0] if str(cause) else type(cause).__name__
