"""[database].url as an administrator writes it: the PostgreSQL forms of psql and of
hosting services mean psycopg 3, SQLite URLs stay as written."""

from __future__ import annotations

import pytest

from fractured.database_url import DatabaseUrlError, normalise


@pytest.mark.parametrize(("written", "used"), [
    ("postgresql://node:pw@db.example.org:5433/fractured?sslmode=require",
     "postgresql+psycopg://node:pw@db.example.org:5433/fractured?sslmode=require"),
    ("postgres://node@db/fractured", "postgresql+psycopg://node@db/fractured"),
    ("postgresql+psycopg://node@db/fractured", "postgresql+psycopg://node@db/fractured"),
    ("postgresql://node:p%40ss%2Fw@db/q", "postgresql+psycopg://node:p%40ss%2Fw@db/q"),
    ("sqlite:////var/lib/fractured/q.db", "sqlite:////var/lib/fractured/q.db"),
    ("sqlite://", "sqlite://"),
])
def test_the_forms_an_administrator_writes(written: str, used: str) -> None:
    assert normalise(written) == used


def test_other_drivers_and_databases_are_refused_without_the_password() -> None:
    with pytest.raises(DatabaseUrlError, match="asyncpg driver is not installed") as info:
        normalise("postgresql+asyncpg://node:secret@db/q")
    assert "secret" not in str(info.value)
    with pytest.raises(DatabaseUrlError, match=r"expected sqlite:///PATH .*'mysql://db/q'"):
        normalise("mysql://db/q")
