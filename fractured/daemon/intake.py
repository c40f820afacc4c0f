"""The listener's records: one received image in, its study (re)opened.

This runs once per received image while the sender waits for its answer, so its
statements are SQLAlchemy Core compiled once and run on the DBAPI cursor
(daemon.prepared), on a pool of their own committed with INTAKE_SYNCHRONOUS
(daemon.connection; bench/ingest.py measures it). The study's move to RECEIVING is the
IMAGE_RECEIVED transition of daemon.states, compiled into the UPDATE as a CASE.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import bindparam, case, insert, literal, select, update
from sqlalchemy.engine import Engine

from fractured.daemon.connection import intake_engine
from fractured.daemon.prepared import Prepared, dbapi_transaction, integrity_errors
from fractured.daemon.schema import Instance, Study, utcnow
from fractured.daemon.states import STUDY, StudyEvent, StudyState


@dataclass(frozen=True)
class ReceivedInstance:
    """What the listener knows of an instance once its file is durably spooled."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    path: Path
    size: int
    calling_ae: str


class InstanceHeld(Exception):
    """record_instance(unheld=True) found a row for the instance after all."""


@dataclass(frozen=True)
class HeldInstance:
    """Where an instance the node already holds belongs, and its spool file."""

    study_instance_uid: str
    path: Path


# record_instance's statements. A late image re-opens the study and counts in its
# `received`; a running worker finds more than its claim saw and re-opens it when it
# finishes. RETURNING finds and touches the study in one statement (SQLite 3.35+,
# PostgreSQL).
_TOUCH_STUDY = (
    update(Study).where(Study.study_instance_uid == bindparam("uid"))
    .values(last_received_at=bindparam("now", type_=Study.last_received_at.type),
            received=Study.received + 1,
            # typed, so the enum is stored as the column stores it (by name)
            state=case(*((Study.state == state, literal(target, Study.state.type))
                         for (state, event), target in STUDY.items()
                         if event is StudyEvent.IMAGE_RECEIVED)))
    .returning(Study.id))
_INSERT_STUDY = insert(Study).returning(Study.id)
_STUDY_COLUMNS = ("study_instance_uid", "state", "first_received_at", "last_received_at",
                  "runs", "received")
_INSTANCE_COLUMNS = ("study_id", "sop_class_uid", "series_instance_uid", "modality", "path",
                     "size", "calling_ae", "received_at")
_INSERT_INSTANCE = insert(Instance)
_REPLACE_INSTANCE = update(Instance).where(Instance.sop_instance_uid == bindparam("uid"))
_HELD = (select(Study.study_instance_uid, Instance.path)
         .join(Study, Study.id == Instance.study_id)
         .where(Instance.sop_instance_uid == bindparam("uid")))


class Intake:
    """Records received instances in the database of `engine` (see the module docstring).

    `clock` gives the times recorded (naive UTC), as the queue's does.
    """

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.clock = clock
        #: what the listener records with (INTAKE_SYNCHRONOUS)
        self.engine = intake_engine(engine)
        #: One listener transaction at a time in this process, on SQLite: it has one
        #: writer anyway, and a thread that finds the file locked sleeps in SQLite's busy
        #: handler (1, 2, 5 ms...) where a lock hands over at once (bench/ingest.py,
        #: 8 associations). Other databases lock rows, not the file: no lock.
        self._lock: AbstractContextManager[object] = (
            threading.Lock() if self.engine.dialect.name == "sqlite" else nullcontext())
        dialect = self.engine.dialect
        self._touch_study = Prepared(_TOUCH_STUDY, dialect)
        self._insert_study = Prepared(_INSERT_STUDY, dialect, _STUDY_COLUMNS)
        self._insert_instance = Prepared(_INSERT_INSTANCE, dialect,
                                         ("sop_instance_uid", *_INSTANCE_COLUMNS))
        self._replace_instance = Prepared(_REPLACE_INSTANCE, dialect, _INSTANCE_COLUMNS)
        self._conflicts = integrity_errors(self.engine)

    def close(self) -> None:
        """Close the listener's connections."""
        self.engine.dispose()

    def held(self, sop_instance_uid: str) -> HeldInstance | None:
        """The study and spool file of an instance already recorded, if any."""
        with self.engine.connect() as conn:
            row = conn.execute(_HELD, {"uid": sop_instance_uid}).first()
        return None if row is None else HeldInstance(row[0], Path(row[1]))

    def record_instance(self, item: ReceivedInstance, *, unheld: bool = False) -> str:
        """Record a spooled instance and (re)open its study; returns 'new' or 'replaced'.

        `unheld` says the caller believes no row holds this instance, so the replace is
        skipped: one statement less for nearly every received image. If a row holds it
        after all (in another study, or inserted by another association a moment ago),
        nothing is recorded and InstanceHeld is raised, for the caller's duplicate rule.

        Two associations can bring the first images of one study at the same moment:
        both find no study and insert one, and the later insert fails on the unique
        UID. That transaction is then run once more, and finds the study.
        """
        try:
            return self._record_instance(item, unheld)
        except self._conflicts:
            try:
                return self._record_instance(item, unheld)
            except self._conflicts:
                if unheld:  # the study exists now: the instance's own row is in the way
                    raise InstanceHeld(item.sop_instance_uid) from None
                raise

    def _record_instance(self, item: ReceivedInstance, unheld: bool) -> str:
        now = self.clock()
        with self._lock, dbapi_transaction(self.engine) as cur:
            cur.execute(self._touch_study.sql,
                        self._touch_study.parameters({"uid": item.study_instance_uid,
                                                      "now": now}))
            row = cur.fetchone()
            if row is None:
                cur.execute(self._insert_study.sql, self._insert_study.parameters({
                    "study_instance_uid": item.study_instance_uid,
                    "state": StudyState.RECEIVING, "first_received_at": now,
                    "last_received_at": now, "runs": 0, "received": 1}))
                row = cur.fetchone()
            columns = {"study_id": row[0], "sop_class_uid": item.sop_class_uid,
                       "series_instance_uid": item.series_instance_uid,
                       "modality": item.modality, "path": str(item.path), "size": item.size,
                       "calling_ae": item.calling_ae, "received_at": now}
            replaced = False
            if not unheld:
                cur.execute(self._replace_instance.sql, self._replace_instance.parameters(
                    {"uid": item.sop_instance_uid, **columns}))
                replaced = cur.rowcount > 0
            if not replaced:
                cur.execute(self._insert_instance.sql, self._insert_instance.parameters(
                    {"sop_instance_uid": item.sop_instance_uid, **columns}))
        return "replaced" if replaced else "new"

    def recorded_paths(self) -> set[str]:
        """The spool file of every recorded instance, as stored (the start-up scan
        compares; strings, since 100,000 Path objects cost more than the query)."""
        with self.engine.connect() as conn:
            return set(conn.scalars(select(Instance.path)))
