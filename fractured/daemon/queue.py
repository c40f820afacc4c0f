"""The durable study queue: SQLAlchemy models, and the state machines of daemon.states
applied to their rows.

Every step of a study's path that must survive a crash is a row here, and every change
of a study's or a delivery's state is a transition of the tables in daemon.states (the
updates' WHERE clauses are the states the table lets an event leave). Claims are
compare-and-set updates guarded by state and lease expiry, which is safe with several
workers on SQLite and PostgreSQL alike; on PostgreSQL, where several nodes share one
database, the claimed row is also locked FOR UPDATE SKIP LOCKED, and so are the
deliveries a node takes to send (Queue.shared).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    Select,
    String,
    Text,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from fractured import database_url
from fractured.daemon.prepared import Prepared, dbapi_transaction, integrity_errors
from fractured.daemon.states import (
    DELIVERY,
    STUDY,
    DeliveryEvent,
    DeliveryState,
    StudyEvent,
    StudyState,
    next_state,
    only_target,
    sources,
)


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every stored time is UTC by convention."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16), index=True)
    first_received_at: Mapped[datetime] = mapped_column(DateTime)
    last_received_at: Mapped[datetime] = mapped_column(DateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime)
    runs: Mapped[int] = mapped_column(Integer, default=0)
    processed_at: Mapped[datetime | None] = mapped_column(DateTime)
    reason: Mapped[str | None] = mapped_column(Text)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(Integer)
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime)


class Delivery(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    run: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    done_at: Mapped[datetime | None] = mapped_column(DateTime)


class ShadowFinding(Base):
    """One image of one study run, as the active and the shadow model saw it (daemon.shadow)."""

    __tablename__ = "shadow_findings"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    run: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime)
    active_model: Mapped[str] = mapped_column(String(128))
    active_probability: Mapped[float] = mapped_column(Float)
    active_level: Mapped[str] = mapped_column(String(16))
    active_boxes: Mapped[int] = mapped_column(Integer)
    shadow_model: Mapped[str] = mapped_column(String(128))
    shadow_probability: Mapped[float] = mapped_column(Float)
    shadow_level: Mapped[str] = mapped_column(String(16))
    shadow_boxes: Mapped[int] = mapped_column(Integer)


class ImageOutcome(Base):
    """What one run concluded about one routed image: its body region ("other" where
    none), its decision level and probability, or, for an image outside the model's
    intended use, no level and why (`scope`). Written with the run's results, in the
    same transaction; read by `fractured status` for the last 7 days against the
    model's expected flag rates. UIDs, a region and numbers: no patient data."""

    __tablename__ = "image_outcomes"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    run: Mapped[int] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    model: Mapped[str] = mapped_column(String(128))
    region: Mapped[str] = mapped_column(String(16))
    scope: Mapped[str] = mapped_column(String(32))  # engine.intended_use.ScopeReason
    level: Mapped[str | None] = mapped_column(String(16))  # None: not analysed
    probability: Mapped[float | None] = mapped_column(Float)


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


@dataclass(frozen=True)
class ClaimedInstance:
    """What the queue knows of one instance of a claimed study (routing uses it all)."""

    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    calling_ae: str
    path: Path


@dataclass(frozen=True)
class ClaimedStudy:
    id: int
    study_instance_uid: str
    run: int
    claimed_at: datetime
    instances: tuple[ClaimedInstance, ...]


@dataclass(frozen=True)
class ResultObject:
    """A result file written for one processing run, to be sent to every destination."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path


@dataclass(frozen=True)
class PendingDelivery:
    id: int
    study_id: int
    destination: str
    sop_class_uid: str
    path: Path
    attempts: int


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


def _intake_engine(engine: Engine) -> Engine:
    """The engine the listener records with: the same SQLite file with
    INTAKE_SYNCHRONOUS (the setting is per connection, hence a pool of its own); any
    other database, or SQLite in memory, uses `engine` itself."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return engine
    return make_engine(engine.url.render_as_string(hide_password=False),
                       synchronous=INTAKE_SYNCHRONOUS)


# record_instance's statements. A late image re-opens the study; a running worker sees
# last_received_at > claimed_at and re-opens it when it finishes. RETURNING finds and
# touches the study in one statement (SQLite 3.35+, PostgreSQL).
_TOUCH_STUDY = (
    update(Study).where(Study.study_instance_uid == bindparam("uid"))
    .values(last_received_at=bindparam("now", type_=Study.last_received_at.type),
            # typed, so the enum is stored as the column stores it (by name)
            state=case(*((Study.state == state, literal(target, Study.state.type))
                         for (state, event), target in STUDY.items()
                         if event is StudyEvent.IMAGE_RECEIVED)))
    .returning(Study.id))
_INSERT_STUDY = insert(Study).returning(Study.id)
_STUDY_COLUMNS = ("study_instance_uid", "state", "first_received_at", "last_received_at",
                  "runs")
_INSTANCE_COLUMNS = ("study_id", "sop_class_uid", "series_instance_uid", "modality", "path",
                     "size", "calling_ae", "received_at")
_INSERT_INSTANCE = insert(Instance)
_REPLACE_INSTANCE = update(Instance).where(Instance.sop_instance_uid == bindparam("uid"))
_HELD = (select(Study.study_instance_uid, Instance.path)
         .join(Study, Study.id == Instance.study_id)
         .where(Instance.sop_instance_uid == bindparam("uid")))


def _pending(d: Delivery) -> PendingDelivery:
    return PendingDelivery(d.id, d.study_id, d.destination, d.sop_class_uid, Path(d.path),
                           d.attempts)


#: The PostgreSQL advisory lock key under which a node creates missing tables.
_SCHEMA_LOCK = 0x66726163  # "frac"


def _create_tables(engine: Engine) -> None:
    """Create the tables that do not exist yet. Nodes that start together on an empty
    PostgreSQL database would each find them missing and all but one fail on the second
    CREATE TABLE: there they take turns, under an advisory lock held to the commit (DDL is
    transactional in PostgreSQL)."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        Base.metadata.create_all(conn)


class Queue:
    """All reads and writes of the study state machine; one short transaction each.

    `clock` gives every time the queue records and compares (naive UTC, as `utcnow`): the
    wall clock for the node, a clock a test moves by hand so that quiet periods, leases
    and retries pass without sleeping.
    """

    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock
        #: Whether several nodes may use this database at once: PostgreSQL, where claims
        #: lock rows (FOR UPDATE SKIP LOCKED) and deliveries being sent are held. A SQLite
        #: file serves the one node on its host.
        self.shared = engine.dialect.name != "sqlite"
        _create_tables(engine)
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        #: what the listener records with (INTAKE_SYNCHRONOUS); `engine` for the rest
        self.intake = _intake_engine(engine)
        #: One listener transaction at a time in this process, on SQLite: it has one
        #: writer anyway, and a thread that finds the file locked sleeps in SQLite's busy
        #: handler (1, 2, 5 ms...) where a lock hands over at once (bench/ingest.py,
        #: 8 associations). Other databases lock rows, not the file: no lock.
        self._intake_lock: AbstractContextManager[object] = (
            threading.Lock() if self.intake.dialect.name == "sqlite" else nullcontext())
        dialect = self.intake.dialect
        self._touch_study = Prepared(_TOUCH_STUDY, dialect)
        self._insert_study = Prepared(_INSERT_STUDY, dialect, _STUDY_COLUMNS)
        self._insert_instance = Prepared(_INSERT_INSTANCE, dialect,
                                         ("sop_instance_uid", *_INSTANCE_COLUMNS))
        self._replace_instance = Prepared(_REPLACE_INSTANCE, dialect, _INSTANCE_COLUMNS)
        self._conflicts = integrity_errors(self.intake)

    def close(self) -> None:
        """Close every database connection (the node is stopping)."""
        self.intake.dispose()
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def record_shadow(self, rows: Sequence[ShadowFinding]) -> None:
        """Store a shadow model's findings beside the active model's (daemon.shadow)."""
        with self._tx() as s:
            s.add_all(rows)

    def shadow_findings(self) -> list[ShadowFinding]:
        """Every stored shadow finding, oldest first."""
        with self._tx() as s:
            return list(s.scalars(select(ShadowFinding).order_by(ShadowFinding.id)))

    def held(self, sop_instance_uid: str) -> HeldInstance | None:
        """The study and spool file of an instance already recorded, if any."""
        with self.intake.connect() as conn:
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

        Core statements compiled once and run on the DBAPI cursor (daemon.prepared),
        committed with INTAKE_SYNCHRONOUS: this runs once per received image while the
        sender waits for its answer (bench/ingest.py).
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
        with self._intake_lock, dbapi_transaction(self.intake) as cur:
            cur.execute(self._touch_study.sql,
                        self._touch_study.parameters({"uid": item.study_instance_uid,
                                                      "now": now}))
            row = cur.fetchone()
            if row is None:
                cur.execute(self._insert_study.sql, self._insert_study.parameters({
                    "study_instance_uid": item.study_instance_uid,
                    "state": StudyState.RECEIVING, "first_received_at": now,
                    "last_received_at": now, "runs": 0}))
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

    def mark_ready(self, quiet_period_s: float) -> list[str]:
        """Studies with no new instance for the quiet period become READY; returns them.

        One UPDATE ... RETURNING: on PostgreSQL an image recorded between a SELECT and
        the UPDATE would not hold its study back, and the sweeps of several nodes would
        each report the same studies.
        """
        cutoff = self.clock() - timedelta(seconds=quiet_period_s)
        with self._tx() as s:
            return list(s.scalars(
                update(Study)
                .where(Study.state.in_(sources(STUDY, StudyEvent.QUIET)),
                       Study.last_received_at <= cutoff)
                .values(state=only_target(STUDY, StudyEvent.QUIET))
                .returning(Study.study_instance_uid),
                execution_options={"synchronize_session": False}))

    def claim(self, worker: str, lease_s: float) -> ClaimedStudy | None:
        """Take the oldest READY study (or one whose worker's lease ran out).

        On a shared database the oldest claimable row is locked FOR UPDATE SKIP LOCKED:
        workers of several nodes claiming at once each get a different study, and none
        waits on a study another holds (one being claimed, finished, or touched by a
        listener). SQLite has one writer at a time and no row locks: there a few
        candidates are tried in turn. Either way the update is a compare-and-set on
        state and lease expiry.
        """
        now = self.clock()
        # a study the table lets a worker claim; one being processed only once its
        # worker's lease ran out
        claimable = or_(*((Study.state == state) & (Study.lease_until < now)
                          if state is StudyState.PROCESSING else Study.state == state
                          for state in sources(STUDY, StudyEvent.CLAIMED)))
        candidates = select(Study.id).where(claimable).order_by(Study.last_received_at)
        candidates = (candidates.limit(1).with_for_update(skip_locked=True) if self.shared
                      else candidates.limit(5))
        with self._tx() as s:
            for study_id in s.scalars(candidates):
                won = s.execute(update(Study).where(Study.id == study_id, claimable).values(
                    state=only_target(STUDY, StudyEvent.CLAIMED), claimed_by=worker,
                    claimed_at=now,
                    lease_until=now + timedelta(seconds=lease_s), runs=Study.runs + 1,
                )).rowcount
                if won:
                    study = s.get(Study, study_id)
                    assert study is not None
                    rows = s.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid,
                                            Instance.modality, Instance.calling_ae,
                                            Instance.path)
                                     .where(Instance.study_id == study_id)
                                     .order_by(Instance.received_at, Instance.id)).all()
                    return ClaimedStudy(study.id, study.study_instance_uid, study.runs, now,
                                        tuple(ClaimedInstance(u, c, m, a, Path(p))
                                              for u, c, m, a, p in rows))
        return None

    def release_leases(self, worker: str) -> int:
        """Give back the studies this worker held when it stopped (or crashed)."""
        with self._tx() as s:
            return s.execute(update(Study).where(
                Study.state.in_(sources(STUDY, StudyEvent.RELEASED)),
                Study.claimed_by == worker,
            ).values(state=only_target(STUDY, StudyEvent.RELEASED), claimed_by=None,
                     lease_until=None)).rowcount

    def restart_quiet_periods(self) -> int:
        """Start the quiet period again for every study still receiving.

        Called when the listener (re)opens: while it was down no sender could reach it,
        and that silence is not a study being complete. Without this, a study cut off by
        a crash would be analysed on the images it had before the sender's retry came.
        """
        with self._tx() as s:
            return s.execute(update(Study).where(Study.state == StudyState.RECEIVING)
                             .values(last_received_at=self.clock())).rowcount

    def finish(self, claim: ClaimedStudy, worker: str, results: Sequence[ResultObject],
               destinations: Sequence[str], *, skipped: str | None = None,
               outcomes: Sequence[ImageOutcome] = ()) -> StudyState | None:
        """Commit a run's results, queue their deliveries and record its images'
        `outcomes`, in one transaction.

        Returns the study's new state, or None when the lease was lost (another worker
        took over): the study is left alone, that worker's run is the one that counts.
        The study's row is locked (PostgreSQL) from the check to the commit, so no other
        worker takes it over, and no listener records a late image unseen, in between.
        """
        now = self.clock()
        with self._tx() as s:
            study = s.get(Study, claim.id, with_for_update=True)
            if study is None or study.claimed_by != worker or study.runs != claim.run:
                return None
            s.add_all(outcomes)
            for result in results:
                for name in destinations:
                    s.add(Delivery(study_id=study.id, run=claim.run, destination=name,
                                   sop_instance_uid=result.sop_instance_uid,
                                   sop_class_uid=result.sop_class_uid, path=str(result.path),
                                   state=DeliveryState.PENDING, attempts=0,
                                   next_attempt_at=now))
            if study.last_received_at > claim.claimed_at:  # images arrived meanwhile
                ended = StudyEvent.LATE_IMAGES
            elif skipped is not None:
                ended = StudyEvent.NOTHING_TO_ANALYSE
            elif results and destinations:
                ended = StudyEvent.QUEUED
            else:
                ended = StudyEvent.NOTHING_TO_SEND
            study.state = next_state(STUDY, StudyState(study.state), ended)
            study.reason = skipped
            study.processed_at = now
            study.claimed_by = study.lease_until = None
            return StudyState(study.state)

    def fail(self, claim: ClaimedStudy, worker: str, reason: str) -> None:
        with self._tx() as s:
            failed = StudyEvent.PROCESSING_FAILED
            s.execute(update(Study).where(Study.id == claim.id, Study.claimed_by == worker,
                                          Study.state.in_(sources(STUDY, failed)))
                      .values(state=only_target(STUDY, failed), reason=reason,
                              claimed_by=None, lease_until=None, processed_at=self.clock()))

    def due_deliveries(self, limit: int = 100) -> list[PendingDelivery]:
        """The deliveries due now, oldest first (a look: nothing is held)."""
        with self._tx() as s:
            return [_pending(d) for d in s.scalars(self._due(limit))]

    def take_due_deliveries(self, lease_s: float, limit: int = 100) -> list[PendingDelivery]:
        """The deliveries due now, for this node to send.

        On a shared database they are held for `lease_s`: their next attempt moves that
        far ahead, under row locks that other nodes' senders skip, so no other node sends
        them meanwhile; record_attempt then sets the real next attempt. A node that dies
        while sending leaves them to any node once the hold has passed. SQLite serves
        one node, whose delivery job runs one at a time: nothing is held there, and a
        restarted node sends at once what it was sending.
        """
        if not self.shared:
            return self.due_deliveries(limit)
        with self._tx() as s:
            rows = list(s.scalars(self._due(limit).with_for_update(skip_locked=True)))
            held_until = self.clock() + timedelta(seconds=lease_s)
            for d in rows:
                d.next_attempt_at = held_until
            return [_pending(d) for d in rows]

    def _due(self, limit: int) -> Select[tuple[Delivery]]:
        return (select(Delivery)
                .where(Delivery.state == DeliveryState.PENDING,
                       Delivery.next_attempt_at <= self.clock())
                .order_by(Delivery.id).limit(limit))

    def record_attempt(self, delivery_id: int, *, status: int | None, error: str | None,
                       retry_in_s: float, max_attempts: int,
                       on_study_done: Callable[[float], None] | None = None) -> DeliveryState:
        """Record one C-STORE attempt; success closes the delivery, else retry or give up.

        `on_study_done` is called, once committed, with the seconds since the study's last
        image arrived when this attempt delivered the study's last result (the metrics'
        end-to-end latency).
        """
        now = self.clock()
        with self._tx() as s:
            d = s.get(Delivery, delivery_id, with_for_update=True)
            assert d is not None
            d.attempts += 1
            d.last_status, d.last_error = status, error
            if error is None:
                attempt, d.done_at = DeliveryEvent.SENT, now
            elif d.attempts >= max_attempts:
                attempt = DeliveryEvent.GAVE_UP
            else:
                attempt, d.next_attempt_at = (DeliveryEvent.RETRY,
                                              now + timedelta(seconds=retry_in_s))
            d.state = next_state(DELIVERY, DeliveryState(d.state), attempt)
            done = self._settle(s, d.study_id)
            state = DeliveryState(d.state)
        if done is not None and on_study_done is not None:
            on_study_done((now - done).total_seconds())
        return state

    @staticmethod
    def _settle(s: Session, study_id: int) -> datetime | None:
        """A DELIVERING study is DONE once every delivery of its latest run is; returns
        its last image's arrival when this made it DONE. The row is locked (PostgreSQL),
        so a late image recorded meanwhile (RECEIVING again) is not overwritten by DONE."""
        study = s.get(Study, study_id, with_for_update=True)
        if study is None or study.state not in sources(STUDY, StudyEvent.DELIVERED):
            return None
        s.flush()
        states = set(s.scalars(select(Delivery.state).where(
            Delivery.study_id == study_id, Delivery.run == study.runs)))
        if states == {DeliveryState.DONE}:
            study.state = next_state(STUDY, StudyState(study.state), StudyEvent.DELIVERED)
            return study.last_received_at
        if DeliveryState.PENDING not in states:
            study.state = next_state(STUDY, StudyState(study.state), StudyEvent.GAVE_UP)
            study.reason = "delivery failed after all attempts"
        return None

    def counts(self) -> dict[str, dict[str, int]]:
        """Studies and deliveries by state, for `fractured status`."""
        with self._tx() as s:
            studies = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)
                                     ).all())
            deliveries = dict(s.execute(select(Delivery.state, func.count())
                                        .group_by(Delivery.state)).all())
        return {"studies": {str(k): v for k, v in studies.items()},
                "deliveries": {str(k): v for k, v in deliveries.items()}}

    def outcomes_since(self, since: datetime) -> dict[str, Any]:
        """Routed images recorded since `since`, for `fractured status`: analysed ones
        per region and level, the others per reason (each run of a study counts its
        images: a study analysed again after a late image counts twice)."""
        with self._tx() as s:
            rows = s.execute(
                select(ImageOutcome.region, ImageOutcome.level, ImageOutcome.scope,
                       func.count())
                .where(ImageOutcome.recorded_at >= since)
                .group_by(ImageOutcome.region, ImageOutcome.level, ImageOutcome.scope)).all()
        regions: dict[str, dict[str, int]] = {}
        outside: dict[str, int] = {}
        for region, level, scope, count in rows:
            if level is None:
                outside[scope] = outside.get(scope, 0) + count
                continue
            entry = regions.setdefault(region, {"images": 0, "possible": 0, "likely": 0})
            entry["images"] += count
            if level in entry:
                entry[level] += count
        return {"since": since.isoformat(), "regions": regions, "not_analysed": outside}

    def studies(self) -> list[dict[str, object]]:
        """One row per study (no patient data: UIDs and states only), in two queries
        whatever the number of studies."""
        with self._tx() as s:
            delivered = dict(s.execute(
                select(Delivery.study_id, func.count())
                .where(Delivery.state == DeliveryState.DONE)
                .group_by(Delivery.study_id)).all())
            rows = s.execute(
                select(Study, func.count(Instance.id)).outerjoin(Instance)
                .group_by(Study.id).order_by(Study.id)).all()
            return [{"study_instance_uid": study.study_instance_uid,
                     "state": str(study.state), "instances": n, "runs": study.runs,
                     "delivered": delivered.get(study.id, 0), "reason": study.reason,
                     "last_received_at": study.last_received_at.isoformat()}
                    for study, n in rows]

    def dead_letters(self) -> list[dict[str, object]]:
        """Deliveries of each study's latest run that gave up (UIDs, states, errors)."""
        with self._tx() as s:
            rows = s.execute(
                select(Delivery, Study.study_instance_uid).join(Study)
                .where(Delivery.state == DeliveryState.FAILED, Delivery.run == Study.runs)
                .order_by(Delivery.id)).all()
            return [{"study_instance_uid": uid, "destination": d.destination,
                     "sop_instance_uid": d.sop_instance_uid, "sop_class_uid": d.sop_class_uid,
                     "attempts": d.attempts, "last_status": d.last_status,
                     "last_error": d.last_error} for d, uid in rows]

    def requeue_dead_letters(self, *, study_instance_uid: str | None = None,
                             destination: str | None = None) -> int:
        """Send dead letters again (all, one study's, or one destination's): their
        attempts start over now, and their studies go back to DELIVERING."""
        now = self.clock()
        with self._tx() as s:
            query = (select(Delivery).join(Study)
                     .where(Delivery.state == DeliveryState.FAILED, Delivery.run == Study.runs))
            if study_instance_uid is not None:
                query = query.where(Study.study_instance_uid == study_instance_uid)
            if destination is not None:
                query = query.where(Delivery.destination == destination)
            deliveries = list(s.scalars(query))
            for d in deliveries:
                d.state = next_state(DELIVERY, DeliveryState(d.state), DeliveryEvent.REQUEUED)
                d.attempts, d.next_attempt_at = 0, now
                study = s.get(Study, d.study_id)
                if study is not None and study.state in sources(STUDY, StudyEvent.REQUEUED):
                    study.state = next_state(STUDY, StudyState(study.state),
                                             StudyEvent.REQUEUED)
                    study.reason = None
            return len(deliveries)
