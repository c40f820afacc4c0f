"""Core statements compiled once and run straight on a DBAPI cursor.

The listener records each received image with three short statements while the sender
waits for its answer. Through SQLAlchemy's Connection each cost about twice what the
database itself spent on it (execution context, result wrapping, pool events: 65 % of
the recording time in a py-spy profile of bench/ingest.py). A `Prepared` statement is
still written as SQLAlchemy Core, compiled for the engine's dialect when the queue is
built, so the SQL, the parameter style and the type conversions (an enum stored by
name, SQLite's datetime strings) are SQLAlchemy's own; only the per-call machinery is
skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql import ClauseElement


class Prepared:
    """One statement, compiled for `dialect`; `column_keys` names the columns an INSERT
    or UPDATE sets from parameters (all of them when None)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect,
                 column_keys: Sequence[str] | None = None) -> None:
        compiled = statement.compile(dialect=dialect,
                                     column_keys=list(column_keys) if column_keys else None)
        self.sql = compiled.string
        bind_names = compiled.bind_names  # type: ignore[attr-defined]
        #: values fixed in the statement itself (literal(), constants in a CASE)
        self._fixed = {name: bind.value for bind, name in bind_names.items()
                       if not bind.required}
        self._processors: list[tuple[str, Callable[[Any], Any]]] = []
        for bind, name in bind_names.items():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                self._processors.append((name, process))
        self._order: list[str] | None = (
            list(compiled.positiontup)  # type: ignore[attr-defined]
            if dialect.positional else None)

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """What the DBAPI's execute takes for `values` (keyed by bind or column name)."""
        params = {**self._fixed, **values}
        for name, process in self._processors:
            params[name] = process(params[name])
        return params if self._order is None else tuple(params[n] for n in self._order)


@contextmanager
def dbapi_transaction(engine: Engine) -> Iterator[Any]:
    """A DBAPI cursor on a pooled connection, committed on success, rolled back on any
    error (the driver's own exceptions pass through: see `integrity_errors`)."""
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        try:
            yield cursor
            connection.commit()
        except BaseException:
            connection.rollback()
            raise
        finally:
            cursor.close()
    finally:
        connection.close()  # back to the pool


def integrity_errors(engine: Engine) -> tuple[type[Exception], ...]:
    """The exceptions a unique-key conflict raises: the driver's, and SQLAlchemy's."""
    return (engine.dialect.loaded_dbapi.IntegrityError, IntegrityError)
