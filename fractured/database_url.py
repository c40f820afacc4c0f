"""[database].url as an administrator writes it, made into the URL SQLAlchemy is given.

The node talks to PostgreSQL through psycopg 3 (a dependency of the package). Admins
write PostgreSQL URLs as its own tools do (`postgresql://user@host/db`) or as hosting
services hand them out (`postgres://...`); SQLAlchemy reads the first as psycopg2, which
is not installed, and does not know the second. Both are taken to mean psycopg here, so
the URL that works with `psql` works with the node. Query parameters (`?sslmode=require`)
go to the driver as they are.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

#: The one PostgreSQL driver the node is installed with.
POSTGRESQL_DRIVER = "postgresql+psycopg"
_POSTGRESQL_SPELLINGS = frozenset({"postgresql", "postgres", POSTGRESQL_DRIVER})
_SQLITE_SPELLINGS = frozenset({"sqlite", "sqlite+pysqlite"})


class DatabaseUrlError(ValueError):
    """The URL names no database the node can use; the message says why (never the
    password)."""


def normalise(url: str) -> str:
    """The SQLAlchemy URL for `url`: SQLite as written, PostgreSQL on psycopg 3."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseUrlError("expected sqlite:///PATH or postgresql://USER@HOST/DATABASE, "
                               "got something that is not a URL") from None
    if parsed.drivername in _SQLITE_SPELLINGS:
        return url
    if parsed.drivername in _POSTGRESQL_SPELLINGS:
        return parsed.set(drivername=POSTGRESQL_DRIVER).render_as_string(hide_password=False)
    shown = parsed.render_as_string(hide_password=True)
    if parsed.get_backend_name() == "postgresql":
        raise DatabaseUrlError(f"the {parsed.get_driver_name()} driver is not installed: write "
                               f"postgresql://... (the node uses psycopg 3), got {shown!r}")
    raise DatabaseUrlError(
        f"expected sqlite:///PATH or postgresql://USER@HOST/DATABASE, got {shown!r}")
