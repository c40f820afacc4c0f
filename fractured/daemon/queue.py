"""The durable study queue: the state machines of daemon.states applied to the rows of
daemon.schema.

Every step of a study's path that must survive a crash is a row, and every change of a
study's or a delivery's state is a transition of the tables in daemon.states (the
updates' WHERE clauses are the states the table lets an event leave). Claims are
compare-and-set updates guarded by state and lease expiry, which is safe with several
workers on SQLite and PostgreSQL alike; on PostgreSQL, where several nodes share one
database, the claimed row is also locked FOR UPDATE SKIP LOCKED, and so are the
deliveries a node takes to send (Queue.shared). The listener's records go through
`Queue.intake` (daemon.intake), what retention removes through `Queue.forget`, and
`fractured status` reads through daemon.reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TypeVar

from sqlalchemy import ColumnElement, Select, case, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from fractured import log
from fractured.daemon.intake import Intake
from fractured.daemon.migrations import prepare
from fractured.daemon.schema import (
    Delivery,
    ImageOutcome,
    Instance,
    ShadowFinding,
    Study,
    utcnow,
)
from fractured.daemon.states import (
    DELIVERY,
    SETTLED,
    STUDY,
    DeliveryEvent,
    DeliveryState,
    StudyEvent,
    StudyState,
    next_state,
    only_target,
    sources,
)

T = TypeVar("T")

_log = log.get("fractured.queue")


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
    received: int  # images recorded for the study when it was claimed (Study.received)
    instances: tuple[ClaimedInstance, ...]


@dataclass(frozen=True)
class ResultObject:
    """A result file written for one processing run, to be sent to every destination."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path


@dataclass(frozen=True)
class PendingDelivery:
    """A delivery due to be sent; with `claimed_by`, one a node took to send
    (Queue.take_due_deliveries), whose attempt it alone may record."""

    id: int
    study_id: int
    destination: str
    sop_class_uid: str
    path: Path
    attempts: int  # made before this claim: the claim's compare-and-set value
    claimed_by: str | None


@dataclass(frozen=True)
class SettledStudy:
    """A study at rest (daemon.states.SETTLED) with no delivery pending, as retention
    plans from it; read again under the study's lock and compared before any of it goes
    (Queue.forget)."""

    id: int
    study_instance_uid: str
    state: StudyState
    last_received_at: datetime
    runs: int
    settled_at: datetime  # its last image, run or delivery attempt, whichever is latest
    images: int  # instance rows
    dead_letters: bool  # a delivery of its latest run gave up


def _pending(d: Delivery) -> PendingDelivery:
    return PendingDelivery(d.id, d.study_id, d.destination, d.sop_class_uid, Path(d.path),
                           d.attempts, d.claimed_by)




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
        applied = prepare(engine)
        if applied:
            _log.info("database.upgraded", revisions=applied, schema=applied[-1])
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        #: the listener's records, on a pool of their own (daemon.intake)
        self.intake = Intake(engine, clock)

    def close(self) -> None:
        """Close every database connection (the node is stopping)."""
        self.intake.close()
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

    def claim(self, worker: str, lease_s: float, max_claims: int = 3) -> ClaimedStudy | None:
        """Take the oldest READY study (or one whose worker's lease ran out).

        A claimable study already claimed `max_claims` times without its run ending
        (its worker died on it: out of memory, a decoder crash) becomes FAILED instead,
        with the reason, logged as `study.abandoned`: a poison study is not retried for
        ever, taking the node down each time.

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
            abandoned = s.execute(
                update(Study).where(claimable, Study.unfinished_claims >= max_claims)
                .values(state=only_target(STUDY, StudyEvent.ABANDONED), claimed_by=None,
                        lease_until=None, processed_at=now,
                        reason=f"worker died {max_claims} times on this study (out of "
                        "memory, or a decoder crash): not analysed again")
                .returning(Study.study_instance_uid, Study.unfinished_claims),
                execution_options={"synchronize_session": False}).all()
            for uid, claims in abandoned:
                _log.error("study.abandoned", study_instance_uid=uid, claims=claims,
                           detail="claimed this many times without its run ending")
            for study_id in s.scalars(candidates):
                won = s.execute(update(Study).where(Study.id == study_id, claimable).values(
                    state=only_target(STUDY, StudyEvent.CLAIMED), claimed_by=worker,
                    claimed_at=now,
                    lease_until=now + timedelta(seconds=lease_s), runs=Study.runs + 1,
                    unfinished_claims=Study.unfinished_claims + 1,
                )).rowcount
                if won:
                    study = s.get(Study, study_id)
                    assert study is not None
                    rows = s.execute(select(Instance.sop_instance_uid, Instance.sop_class_uid,
                                            Instance.modality, Instance.calling_ae,
                                            Instance.path)
                                     .where(Instance.study_id == study_id)
                                     .order_by(Instance.received_at, Instance.id)).all()
                    return ClaimedStudy(study.id, study.study_instance_uid, study.runs,
                                        study.received,
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

    def renew_study(self, claim: ClaimedStudy, worker: str, lease_s: float) -> bool:
        """Extend the lease of a study this worker is still processing to `lease_s` from
        now; False when it is no longer this run's (taken over after the lease ran out,
        or released)."""
        now = self.clock()
        with self._tx() as s:
            return s.execute(update(Study).where(
                Study.id == claim.id, Study.claimed_by == worker, Study.runs == claim.run,
                Study.state.in_(sources(STUDY, StudyEvent.RELEASED)),
            ).values(lease_until=now + timedelta(seconds=lease_s))).rowcount == 1

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
        The study is locked (`_lock`) from the check to the commit, so no other worker
        takes it over, and no listener records a late image unseen, in between; an image
        recorded after the claim, however the clocks stand, re-opens it.
        """
        now = self.clock()
        with self._tx() as s:
            _lock(s, Study.id == claim.id)
            study = s.get(Study, claim.id)
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
            if study.received > claim.received:  # images arrived meanwhile
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
            study.unfinished_claims = 0
            return StudyState(study.state)

    def fail(self, claim: ClaimedStudy, worker: str, reason: str) -> None:
        with self._tx() as s:
            failed = StudyEvent.PROCESSING_FAILED
            s.execute(update(Study).where(Study.id == claim.id, Study.claimed_by == worker,
                                          Study.state.in_(sources(STUDY, failed)))
                      .values(state=only_target(STUDY, failed), reason=reason,
                              claimed_by=None, lease_until=None, processed_at=self.clock(),
                              unfinished_claims=0))

    def due_deliveries(self, limit: int = 100) -> list[PendingDelivery]:
        """The deliveries due now, oldest first (a look: nothing is held)."""
        with self._tx() as s:
            return [_pending(d) for d in s.scalars(self._due(limit))]

    def take_due_deliveries(self, worker: str, lease_s: float, limit: int = 100
                            ) -> list[PendingDelivery]:
        """The deliveries due now, claimed by `worker` to send.

        Only that claim's attempt is recorded (record_attempt). On a shared database they
        are also held for `lease_s`, renewed while the sending goes on (renew_deliveries):
        their next attempt moves that far ahead, under row locks that other nodes'
        senders skip, so no other node sends them meanwhile; record_attempt then sets the
        real next attempt. A node that dies while sending leaves them to any node once
        the hold has passed, and its claim with them. SQLite serves one node, whose
        delivery job runs one at a time: nothing is held there, and a restarted node
        sends at once what it was sending.
        """
        query = self._due(limit)
        if self.shared:
            query = query.with_for_update(skip_locked=True)
        with self._tx() as s:
            rows = list(s.scalars(query))
            held_until = self.clock() + timedelta(seconds=lease_s)
            for d in rows:
                d.claimed_by = worker
                if self.shared:
                    d.next_attempt_at = held_until
            return [_pending(d) for d in rows]

    def renew_deliveries(self, taken: Sequence[PendingDelivery], lease_s: float) -> int:
        """Hold the deliveries of `taken` whose attempt is not recorded yet for another
        `lease_s` from now (a slow PACS); returns how many are still this claim's."""
        ids = [d.id for d in taken]
        still_taken = ((Delivery.id.in_(ids)) & (Delivery.state == DeliveryState.PENDING)
                       & Delivery.claimed_by.in_({d.claimed_by for d in taken}))
        with self._tx() as s:
            if not self.shared:  # nothing is held (take_due_deliveries)
                return s.execute(select(func.count()).where(still_taken)).scalar_one()
            return s.execute(update(Delivery).where(still_taken).values(
                next_attempt_at=self.clock() + timedelta(seconds=lease_s))).rowcount

    def _due(self, limit: int) -> Select[tuple[Delivery]]:
        return (select(Delivery)
                .where(Delivery.state == DeliveryState.PENDING,
                       Delivery.next_attempt_at <= self.clock())
                .order_by(Delivery.id).limit(limit))

    def record_attempt(self, taken: PendingDelivery, *, status: int | None,
                       error: str | None, retry_in_s: float, max_attempts: int,
                       on_study_done: Callable[[float], None] | None = None
                       ) -> DeliveryState | None:
        """Record the C-STORE attempt of the claim `taken`; success closes the delivery,
        else retry or give up.

        Returns the delivery's new state, or None when `taken` is no longer the
        delivery's claim (another node took it over once the hold ran out, and its
        attempt is the one that counts): nothing is recorded, so a late failure cannot
        undo the other node's success. `on_study_done` is called, once committed, with
        the seconds since the study's last image arrived when this attempt delivered the
        study's last result (the metrics' end-to-end latency).
        """
        now = self.clock()
        with self._tx() as s:
            s.execute(update(Delivery).where(Delivery.id == taken.id)  # lock it (_lock)
                      .values(state=Delivery.state))
            d = s.get(Delivery, taken.id)
            if (d is None or d.state != DeliveryState.PENDING or taken.claimed_by is None
                    or d.claimed_by != taken.claimed_by or d.attempts != taken.attempts):
                return None
            d.attempts += 1
            d.claimed_by = None
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
        _lock(s, Study.id == study_id)
        study = s.get(Study, study_id)
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

    def requeue_dead_letters(self, *, study_instance_uid: str | None = None,
                             destination: str | None = None) -> int:
        """Send dead letters again (all, one study's, or one destination's): their
        attempts start over now, and their studies go back to DELIVERING."""
        now = self.clock()
        with self._tx() as s:
            _lock(s, Study.id.in_(select(Delivery.study_id)
                                  .where(Delivery.state == DeliveryState.FAILED)))
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

    def settled(self, settled_before: datetime, study_id: int | None = None
                ) -> list[SettledStudy]:
        """Settled studies with no delivery pending whose last image came before
        `settled_before` (they cannot have settled later), or only study `study_id`."""
        with self.engine.connect() as conn:
            return _settled(conn, settled_before, study_id)

    def study_files(self, study_id: int) -> list[tuple[Path, datetime]]:
        """Each recorded image file of a study, with when its row was written."""
        with self.engine.connect() as conn:
            return [(Path(path), received_at) for path, received_at in conn.execute(
                select(Instance.path, Instance.received_at)
                .where(Instance.study_id == study_id))]

    def record_count(self, study: SettledStudy) -> int:
        """How many rows hold a study: its own, its instances, deliveries, shadow
        findings and image outcomes."""
        with self.engine.connect() as conn:
            return 1 + study.images + sum(
                conn.execute(select(func.count()).where(where)).scalar_one()
                for where in (Delivery.study_id == study.id,
                              ShadowFinding.study_instance_uid == study.study_instance_uid,
                              ImageOutcome.study_instance_uid == study.study_instance_uid))

    def forget(self, study: SettledStudy, now: datetime, remove: Callable[[], T | None], *,
               records: bool, images: bool) -> tuple[T, int] | None:
        """Remove a settled study's files and then its rows, under the study's lock.

        An UPDATE that changes nothing takes the row lock (on SQLite the database's write
        lock), so a late image for the study waits for the commit, and then finds the
        study (re-opened) or none (made anew): the image is kept either way. Under the
        lock the study is read again; if anything changed since `study` was read (its
        state, an image, a run, a delivery) nothing goes and None is returned. Else
        `remove` removes the files (None from it: leave everything), and then go the
        instance rows (`images`) or every row of the study (`records`), children first,
        in the same transaction: a crash in between leaves rows without files, never
        files without rows (daemon.recovery would take those for a new study).
        Returns what `remove` returned and the number of rows deleted.
        """
        with self.engine.begin() as conn:
            conn.execute(update(Study).where(Study.id == study.id).values(state=Study.state))
            if _settled(conn, now, study.id) != [study]:
                return None
            removed = remove()
            if removed is None:
                return None
            if records:
                statements = (
                    delete(ShadowFinding)
                    .where(ShadowFinding.study_instance_uid == study.study_instance_uid),
                    delete(ImageOutcome)
                    .where(ImageOutcome.study_instance_uid == study.study_instance_uid),
                    delete(Delivery).where(Delivery.study_id == study.id),
                    delete(Instance).where(Instance.study_id == study.id),
                    delete(Study).where(Study.id == study.id))
            elif images:
                statements = (delete(Instance).where(Instance.study_id == study.id),)
            else:
                statements = ()
            return removed, sum(conn.execute(statement).rowcount for statement in statements)


def _lock(s: Session, which: ColumnElement[bool]) -> None:
    """Lock the studies `which` selects for the rest of the transaction, before it reads
    them: an UPDATE that changes nothing takes their row locks on PostgreSQL and the
    database's write lock on SQLite, where a transaction that starts with a read holds
    no lock until its first write (the driver begins it only then), so a listener's
    record committed between that read and the write would be overwritten. A
    listener's record of an image for a locked study waits for the commit."""
    s.execute(update(Study).where(which).values(state=Study.state))


def _settled(conn: Connection, settled_before: datetime, study_id: int | None
             ) -> list[SettledStudy]:
    """Queue.settled, inside a transaction of the caller's."""
    deliveries = (
        select(Delivery.study_id,
               func.max(Delivery.done_at).label("done_at"),
               # a failed delivery's last attempt was made when it was due
               func.max(Delivery.next_attempt_at).label("attempted_at"),
               func.sum(case((Delivery.state == DeliveryState.PENDING, 1), else_=0))
               .label("pending"),
               func.sum(case(((Delivery.state == DeliveryState.FAILED)
                              & (Delivery.run == Study.runs), 1), else_=0))
               .label("dead_letters"))
        .join(Study, Study.id == Delivery.study_id).group_by(Delivery.study_id).subquery())
    images = (select(Instance.study_id, func.count().label("images"))
              .group_by(Instance.study_id).subquery())
    query = (select(Study.id, Study.study_instance_uid, Study.state, Study.last_received_at,
                    Study.runs, Study.processed_at, deliveries.c.done_at,
                    deliveries.c.attempted_at, deliveries.c.dead_letters, images.c.images)
             .outerjoin(deliveries, deliveries.c.study_id == Study.id)
             .outerjoin(images, images.c.study_id == Study.id)
             .where(Study.state.in_(SETTLED), Study.last_received_at <= settled_before,
                    func.coalesce(deliveries.c.pending, 0) == 0)
             .order_by(Study.id))
    if study_id is not None:
        query = query.where(Study.id == study_id)
    found = []
    for row in conn.execute(query):
        settled = max(t for t in (row.last_received_at, row.processed_at, row.done_at,
                                  row.attempted_at) if t is not None)
        found.append(SettledStudy(row.id, row.study_instance_uid, StudyState(row.state),
                                  row.last_received_at, row.runs, settled, row.images or 0,
                                  bool(row.dead_letters)))
    return found
