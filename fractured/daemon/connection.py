"""Connections to the node's database, and how durable each kind of commit is.

SQLite is set up for a multi-threaded server; PostgreSQL is reached through psycopg
with pooled connections checked before use. The listener records on a pool of its own
(`intake_engine`), with a lighter durability setting that daemon.recovery makes safe.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from fractured import database_url

#: SQLite's synchronous setting for each kind of transaction. FULL: a commit is on disk
#: when it returns (the worker's and the sender's state changes). NORMAL for what the
#: listener records: the commit survives the process being killed, and a power cut may
#: take the last ones back, but each recorded image's file was fsynced before its row
#: was written and the start-up scan (daemon.recovery) records a spool file that has no
#: row. That saves an fsync per received image, the largest part of the listener's
#: database work (bench/ingest.py).
#:
#: PostgreSQL keeps every commit durable (synchronous_commit on), the listener's too. Its
#: counterpart of NORMAL, `SET LOCAL synchronous_commit = off`, saved 0.3 ms of 0.8 per
#: recorded image (local server, loopback), but the scan that makes NORMAL safe runs when
#: a node starts: a PostgreSQL server crashes and restarts alone, and the files whose
#: rows it lost would wait unseen for the next start of some node.
SYNCHRONOUS = "FULL"
INTAKE_SYNCHRONOUS = "NORMAL"


#: Seconds a node waits for PostgreSQL to accept a connection before the attempt fails
#: (libpq waits for the operating system's TCP timeout otherwise, minutes).
CONNECT_TIMEOUT_S = 30


def make_engine(url: str, *, synchronous: str = SYNCHRONOUS) -> Engine:
    """An engine for [database].url (database_url.normalise): SQLite set up for a
    multi-threaded server (WAL, busy timeout, `synchronous`: see SYNCHRONOUS), or
    PostgreSQL on psycopg, whose pooled connections are checked before use so that a
    database restart costs no failed C-STORE."""
    url = database_url.normalise(url)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True,
                             connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    engine = create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()
    return engine


def intake_engine(engine: Engine) -> Engine:
    """The engine the listener records with: the same SQLite file with
    INTAKE_SYNCHRONOUS (the setting is per connection, hence a pool of its own); any
    other database, or SQLite in memory, uses `engine` itself."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return engine
    return make_engine(engine.url.render_as_string(hide_password=False),
                       synchronous=INTAKE_SYNCHRONOUS)
