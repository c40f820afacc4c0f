"""The queue database's schema, as Alembic revisions in `versions/`, and bringing a
database to the one this code knows.

`prepare` runs whenever the node or a command opens the database. An empty database is
built by running every revision; a database that fractured 0.8.1 or earlier made (its
tables from `create_all`, no version table) is that release's schema, the baseline
revision, and is recorded as such before the later revisions run; a database at a
revision this code does not know was made by a newer fractured and is refused, naming
both revisions, rather than used with a schema the code cannot read. On PostgreSQL,
nodes that start together take turns under an advisory lock held to the commit (DDL is
transactional there), so one upgrades and the others find it done.

Revisions only add (columns with a default, tables, indexes), so a node of the previous
release still running while an administrator's newer `fractured` command upgraded the
database goes on working until it is restarted.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, func, inspect, select
from sqlalchemy.engine import Engine

#: The revision whose schema fractured 0.8.1 and earlier made with create_all.
BASELINE = "0001"

#: The PostgreSQL advisory lock key under which a node brings the schema up to date.
SCHEMA_LOCK = 0x66726163  # "frac"


class SchemaError(Exception):
    """The database's schema is not one this code can bring up to date."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The revision this code's tables (daemon.schema) are."""
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def current(conn: Connection) -> str | None:
    """The database's revision; None for an empty database or one made before
    revisions (see `prepare`)."""
    return MigrationContext.configure(conn).get_current_revision()


def prepare(engine: Engine) -> list[str]:
    """Bring the database to `head()`; returns the revisions applied, oldest first."""
    scripts = _scripts()
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
        start = current(conn)
        if start is None and inspect(conn).has_table("studies"):
            start = BASELINE  # made by create_all before revisions: the baseline schema
            MigrationContext.configure(conn).stamp(scripts, BASELINE)
        if start is not None:
            try:
                scripts.get_revision(start)
            except CommandError:
                raise SchemaError(
                    f"the database's schema is revision {start}, which this fractured does "
                    f"not know (it knows up to {scripts.get_current_head()}): a newer "
                    "fractured made it; run that version, or a newer one") from None
        applied = [script.revision for script in reversed(list(
            scripts.iterate_revisions("head", start or "base")))]
        if applied:
            _upgrade(conn)
    return applied


def _upgrade(conn: Connection) -> None:
    """Run the revisions from the database's to head, inside the caller's transaction:
    Alembic's own upgrade command, whose env.py (here) takes the connection from the
    config's attributes, as Alembic's cookbook shares one."""
    config = _config()
    config.attributes["connection"] = conn
    command.upgrade(config, "head")
