"""The study/delivery state machine on a real SQLite file, with a clock the tests move
(tests/integration/test_queue_postgres.py runs the same tests on PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event
from structlog.testing import capture_logs

from fractured.daemon import reports
from fractured.daemon.connection import make_engine
from fractured.daemon.intake import ReceivedInstance
from fractured.daemon.queue import Queue, ResultObject
from fractured.daemon.states import DeliveryState, StudyState

STUDY = "1.2.3.4"


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A new, empty SQLite file (overridden with PostgreSQL in test_queue_postgres)."""
    return f"sqlite:///{tmp_path / 'q.db'}"


class Clock:
    """A clock the test moves: quiet periods, leases and retries pass without sleeping."""

    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 8, 0)  # naive UTC, as queue.utcnow gives

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def queue(database_url: str, clock: Clock) -> Iterator[Queue]:
    queue = Queue(make_engine(database_url), clock)
    yield queue
    queue.close()


def received(sop: str, study: str = STUDY) -> ReceivedInstance:
    return ReceivedInstance(study_instance_uid=study, series_instance_uid="1.2.3.4.1",
                            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            modality="CR", path=Path(f"/spool/{sop}.dcm"), size=10,
                            calling_ae="MOD")


def state(queue: Queue, study: str = STUDY) -> str:
    return next(r["state"] for r in reports.studies(queue.engine)
                if r["study_instance_uid"] == study)


def test_quiet_period_then_claim_then_deliver_then_done(queue: Queue) -> None:
    assert queue.intake.record_instance(received("1.1")) == "new"
    assert queue.intake.record_instance(received("1.2")) == "new"
    assert queue.mark_ready(quiet_period_s=60) == []  # images still arriving
    assert queue.mark_ready(quiet_period_s=0) == [STUDY]
    claim = queue.claim("w1", lease_s=60)
    assert claim is not None and claim.run == 1
    assert [i.sop_instance_uid for i in claim.instances] == ["1.1", "1.2"]
    assert queue.claim("w2", lease_s=60) is None  # nobody else gets it

    results = [ResultObject("9.1", "1.2.840.10008.5.1.4.1.1.88.34", Path("/r/9.1.dcm")),
               ResultObject("9.2", "1.2.840.10008.5.1.4.1.1.7", Path("/r/9.2.dcm"))]
    assert queue.finish(claim, "w1", results, ["pacs"]) == StudyState.DELIVERING
    assert sorted(d.path.name for d in queue.due_deliveries()) == ["9.1.dcm", "9.2.dcm"]
    due = queue.take_due_deliveries("n1", lease_s=60)
    assert sorted(d.path.name for d in due) == ["9.1.dcm", "9.2.dcm"]
    assert queue.record_attempt(due[0], status=0, error=None, retry_in_s=0,
                                max_attempts=3) == DeliveryState.DONE
    assert state(queue) == "delivering"
    assert queue.record_attempt(due[1], status=0, error=None, retry_in_s=0,
                                max_attempts=3) == DeliveryState.DONE
    assert state(queue) == "done"
    assert reports.counts(queue.engine)["deliveries"] == {"done": 2}


def test_failed_delivery_is_retried_then_given_up(queue: Queue, clock: Clock) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    queue.finish(claim, "w1", [ResultObject("9.1", "1.2", Path("/r/9.1.dcm"))], ["pacs"])
    (item,) = queue.take_due_deliveries("n1", lease_s=60)
    assert queue.record_attempt(item, status=None, error="no association",
                                retry_in_s=3600, max_attempts=2) == DeliveryState.PENDING
    assert queue.due_deliveries() == []  # not due again for an hour
    clock.advance(3600)
    (item,) = queue.take_due_deliveries("n1", lease_s=60)
    assert queue.record_attempt(item, status=0xA700, error="refused", retry_in_s=0,
                                max_attempts=2) == DeliveryState.FAILED
    assert state(queue) == "failed"


def test_restart_starts_the_quiet_period_of_receiving_studies_again(
        queue: Queue, clock: Clock) -> None:
    queue.intake.record_instance(received("1.1", "9.1"))  # cut off by a crash, still receiving
    queue.intake.record_instance(received("2.1", "9.2"))
    assert sorted(queue.mark_ready(0)) == ["9.1", "9.2"]
    queue.intake.record_instance(received("3.1", "9.3"))
    clock.advance(50)
    assert queue.restart_quiet_periods() == 1  # only 9.3 is still receiving
    assert queue.mark_ready(40) == []  # its silence counts from the restart
    clock.advance(50)
    assert queue.mark_ready(40) == ["9.3"]


def test_late_image_reopens_a_done_study(queue: Queue) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    assert queue.finish(claim, "w1", [], []) == StudyState.DONE
    queue.intake.record_instance(received("1.2"))
    assert state(queue) == "receiving"
    queue.mark_ready(0)
    again = queue.claim("w1", 60)
    assert again is not None and again.run == 2 and len(again.instances) == 2


def test_image_arriving_during_processing_reopens_after_the_run(queue: Queue,
                                                                clock: Clock) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    clock.advance(1)
    queue.intake.record_instance(received("1.2"))
    assert state(queue) == "processing"  # the running worker is not disturbed
    assert queue.finish(claim, "w1", [], []) == StudyState.RECEIVING


def test_an_image_stamped_before_the_claim_by_a_clock_behind_still_reopens(
        queue: Queue, clock: Clock) -> None:
    """The listener took its time before it waited for the database, or another node's
    clock is behind: the late image's time is before the claim's. Counted, not timed."""
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    queue.intake.clock = lambda: clock.now - timedelta(seconds=5)
    queue.intake.record_instance(received("1.2"))
    assert queue.finish(claim, "w1", [], []) == StudyState.RECEIVING


@contextmanager
def image_recorded_once_it_reads(queue: Queue, table: str, sop: str) -> Iterator[threading.Thread]:
    """Record image `sop` from another thread (a listener) the moment the queue's
    transaction first reads `table`, and give that thread half a second: it finishes at
    once if nothing holds the study, or waits for the transaction's commit."""
    listener = threading.Thread(target=queue.intake.record_instance, args=(received(sop),))

    def after_read(_conn, _cursor, statement: str, *_args) -> None:  # type: ignore[no-untyped-def]
        if listener.ident is None and statement.lstrip().upper().startswith("SELECT") \
                and f"FROM {table}" in statement:
            listener.start()
            listener.join(timeout=0.5)

    event.listen(queue.engine, "after_cursor_execute", after_read)
    try:
        yield listener
    finally:
        event.remove(queue.engine, "after_cursor_execute", after_read)
        listener.join()


def test_an_image_recorded_while_a_run_commits_reopens_the_study(queue: Queue) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    with image_recorded_once_it_reads(queue, "studies", "1.2") as listener:
        queue.finish(claim, "w1", [ResultObject("9.1", "1.2", Path("/r/9.1.dcm"))], ["pacs"])
    assert listener.ident is not None
    assert state(queue) == "receiving"  # analysed again with the late image


def test_an_image_recorded_while_the_last_delivery_settles_reopens_the_study(
        queue: Queue) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    queue.finish(claim, "w1", [ResultObject("9.1", "1.2", Path("/r/9.1.dcm"))], ["pacs"])
    (delivery,) = queue.take_due_deliveries("n1", lease_s=60)
    with image_recorded_once_it_reads(queue, "studies", "1.2") as listener:
        queue.record_attempt(delivery, status=0, error=None, retry_in_s=0,
                             max_attempts=3)
    assert listener.ident is not None
    assert state(queue) == "receiving"  # not DONE over the late image


def test_expired_lease_is_taken_over_and_the_old_run_is_ignored(queue: Queue,
                                                                 clock: Clock) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    first = queue.claim("w1", lease_s=1)
    assert first is not None
    clock.advance(2)
    second = queue.claim("w2", lease_s=60)
    assert second is not None and second.run == 2
    # The first worker comes back late: its results are not recorded.
    result = [ResultObject("9.1", "1.2", Path("/r/9.1.dcm"))]
    assert queue.finish(first, "w1", result, ["pacs"]) is None
    assert queue.due_deliveries() == []
    assert queue.finish(second, "w2", result, ["pacs"]) == StudyState.DELIVERING
    assert len(queue.due_deliveries()) == 1


def test_restarted_worker_releases_its_own_leases(queue: Queue) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.intake.record_instance(received("2.1", study="1.2.3.5"))
    queue.mark_ready(0)
    assert queue.claim("w1", 600) is not None
    assert queue.claim("w2", 600) is not None
    assert queue.release_leases("w1") == 1
    states = sorted(r["state"] for r in reports.studies(queue.engine))
    assert states == ["processing", "ready"]


def test_same_instance_twice_is_one_row(queue: Queue) -> None:
    assert queue.intake.record_instance(received("1.1")) == "new"
    assert queue.intake.record_instance(received("1.1")) == "replaced"
    assert reports.studies(queue.engine)[0]["instances"] == 1


def dead_letters_of(queue: Queue, study: str, destinations: list[str]) -> None:
    """A study whose one result gave up at every destination."""
    queue.intake.record_instance(received(f"{study}.1", study))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    queue.finish(claim, "w1", [ResultObject(f"{study}.9", "1.2", Path("/r/x.dcm"))],
                 destinations)
    for item in queue.take_due_deliveries("n1", lease_s=60):
        queue.record_attempt(item, status=None, error=f"down {item.destination}",
                             retry_in_s=0, max_attempts=1)


def test_dead_letters_are_listed_and_requeued_by_study_and_destination(queue: Queue) -> None:
    dead_letters_of(queue, "1.1", ["pacs", "archive"])
    dead_letters_of(queue, "2.2", ["pacs"])
    letters = reports.dead_letters(queue.engine)
    assert sorted((d["study_instance_uid"], d["destination"], d["last_error"])
                  for d in letters) == [("1.1", "archive", "down archive"),
                                        ("1.1", "pacs", "down pacs"), ("2.2", "pacs", "down pacs")]
    assert state(queue, "1.1") == "failed" and state(queue, "2.2") == "failed"
    assert queue.requeue_dead_letters(study_instance_uid="1.1", destination="pacs") == 1
    assert state(queue, "1.1") == "delivering" and state(queue, "2.2") == "failed"
    (due,) = queue.due_deliveries()
    assert (due.destination, due.attempts) == ("pacs", 0)  # attempts start over
    assert queue.requeue_dead_letters(destination="pacs") == 1  # 2.2's
    assert queue.requeue_dead_letters() == 1  # the archive's is all that is left
    assert reports.dead_letters(queue.engine) == [] and len(queue.due_deliveries()) == 3


def test_concurrent_first_images_of_one_study_are_all_recorded(queue: Queue) -> None:
    """Eight listener threads recording images of the same studies at once (a PACS
    sending one study over several associations): none may fail, though each may find
    the study missing and create it at the same moment (bench/ingest found this)."""
    shared = queue
    errors: list[Exception] = []

    def sender(k: int) -> None:
        for i in range(40):
            try:
                shared.intake.held(f"{k}.{i}")
                shared.intake.record_instance(received(f"{k}.{i}", f"9.{i}"))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(s["instances"] for s in reports.studies(shared.engine)) == 320


def queued_deliveries(queue: Queue, count: int) -> None:
    """One study processed, `count` results waiting for one destination."""
    queue.intake.record_instance(received("7.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", 60)
    assert claim is not None
    queue.finish(claim, "w1", [ResultObject(f"9.{i}", "1.2", Path(f"/r/9.{i}.dcm"))
                               for i in range(count)], ["pacs"])


def test_deliveries_taken_by_one_node_are_held_from_the_others(queue: Queue,
                                                                clock: Clock) -> None:
    queued_deliveries(queue, 2)
    assert len(queue.take_due_deliveries("n1", lease_s=20)) == 2
    if not queue.shared:  # one node, one delivery job at a time: nothing to hold
        assert len(queue.take_due_deliveries("n2", lease_s=20)) == 2
        return
    assert queue.take_due_deliveries("n2", lease_s=20) == []  # another node's sender
    assert queue.due_deliveries() == []
    clock.advance(30)  # the taker died: after the hold, any node sends them
    again = queue.take_due_deliveries("n2", lease_s=60)
    assert len(again) == 2
    for item in again:
        queue.record_attempt(item, status=0, error=None, retry_in_s=0, max_attempts=3)
    assert state(queue) == "done"


def test_a_late_attempt_after_a_takeover_is_not_recorded(queue: Queue, clock: Clock) -> None:
    """A node whose hold ran out while a slow PACS answered comes back with a failure
    after another node delivered: the delivery stays done, the study too."""
    queued_deliveries(queue, 1)
    (slow,) = queue.take_due_deliveries("n1", lease_s=20)
    clock.advance(30)  # on SQLite nothing is held: the next take is a takeover anyway
    (fast,) = queue.take_due_deliveries("n2", lease_s=20)
    assert queue.record_attempt(fast, status=0, error=None, retry_in_s=0,
                                max_attempts=3) == DeliveryState.DONE
    assert queue.record_attempt(slow, status=None, error="no response", retry_in_s=0,
                                max_attempts=1) is None
    assert state(queue) == "done"
    assert reports.counts(queue.engine)["deliveries"] == {"done": 1}
    assert reports.dead_letters(queue.engine) == []


def test_a_late_success_after_a_takeover_is_not_counted_twice(queue: Queue,
                                                               clock: Clock) -> None:
    """The other node's attempt failed and is to be retried: the first node's late
    attempt does not count against the retries, and cannot close it either."""
    queued_deliveries(queue, 1)
    (slow,) = queue.take_due_deliveries("n1", lease_s=20)
    clock.advance(30)
    (other,) = queue.take_due_deliveries("n2", lease_s=20)
    assert queue.record_attempt(other, status=None, error="refused", retry_in_s=60,
                                max_attempts=3) == DeliveryState.PENDING
    assert queue.record_attempt(slow, status=0, error=None, retry_in_s=0,
                                max_attempts=3) is None
    clock.advance(60)
    (again,) = queue.take_due_deliveries("n1", lease_s=20)
    assert again.attempts == 1
    assert queue.record_attempt(slow, status=0, error=None, retry_in_s=0,
                                max_attempts=3) is None  # an old claim of the same node
    assert queue.record_attempt(again, status=0, error=None, retry_in_s=0,
                                max_attempts=3) == DeliveryState.DONE


def test_a_look_at_the_due_deliveries_records_nothing(queue: Queue) -> None:
    queued_deliveries(queue, 1)
    (looked,) = queue.due_deliveries()
    assert looked.claimed_by is None
    assert queue.record_attempt(looked, status=0, error=None, retry_in_s=0,
                                max_attempts=3) is None
    assert state(queue) == "delivering"


def test_renewed_deliveries_stay_held(queue: Queue, clock: Clock) -> None:
    queued_deliveries(queue, 2)
    taken = queue.take_due_deliveries("n1", lease_s=20)
    clock.advance(15)
    assert queue.renew_deliveries(taken, lease_s=20) == 2
    assert queue.record_attempt(taken[0], status=0, error=None, retry_in_s=0,
                                max_attempts=3) == DeliveryState.DONE
    clock.advance(15)  # 30 s after the take: held only because it was renewed
    assert queue.renew_deliveries(taken, lease_s=20) == 1  # the other one is recorded
    if queue.shared:
        assert queue.take_due_deliveries("n2", lease_s=20) == []
    clock.advance(30)  # renewal stopped (the node died): the other node takes it
    (other,) = queue.take_due_deliveries("n2", lease_s=20)
    assert queue.renew_deliveries(taken, lease_s=20) == 0
    assert queue.record_attempt(other, status=0, error=None, retry_in_s=0,
                                max_attempts=3) == DeliveryState.DONE


def test_a_renewed_study_lease_is_not_taken_over(queue: Queue, clock: Clock) -> None:
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    claim = queue.claim("w1", lease_s=60)
    assert claim is not None
    for _ in range(4):  # four minutes of a lease of one, renewed every 40 s
        clock.advance(40)
        assert queue.renew_study(claim, "w1", lease_s=60)
        assert queue.claim("w2", lease_s=60) is None
    clock.advance(61)  # renewal stopped: another worker takes it over
    second = queue.claim("w2", lease_s=60)
    assert second is not None and second.run == 2
    assert not queue.renew_study(claim, "w1", lease_s=60)
    assert queue.finish(claim, "w1", [], []) is None
    assert queue.renew_study(second, "w2", lease_s=60)
    assert queue.finish(second, "w2", [], []) == StudyState.DONE
    assert not queue.renew_study(second, "w2", lease_s=60)  # finished: nothing to hold


def test_a_study_its_worker_died_on_max_claims_times_is_failed(queue: Queue,
                                                               clock: Clock) -> None:
    """A poison study (its decoding kills the node) is claimed, released by the
    restarted node, claimed again; at the third death it is FAILED, not claimed a
    fourth time, and the ordinary study behind it is claimed."""
    queue.intake.record_instance(received("1.1"))
    clock.advance(1)
    queue.intake.record_instance(received("2.1", study="1.2.3.5"))
    queue.mark_ready(0)
    for _ in range(3):
        claim = queue.claim("w1", 60, max_claims=3)
        assert claim is not None and claim.study_instance_uid == STUDY
        assert queue.release_leases("w1") == 1  # the node died; its restart releases it
    with capture_logs() as logs:
        other = queue.claim("w1", 60, max_claims=3)
    assert other is not None and other.study_instance_uid == "1.2.3.5"
    assert state(queue) == "failed"
    (row,) = [r for r in reports.studies(queue.engine) if r["study_instance_uid"] == STUDY]
    assert row["reason"].startswith("worker died 3 times on this study")
    assert [(e["event"], e["study_instance_uid"], e["claims"]) for e in logs] == [
        ("study.abandoned", STUDY, 3)]


def test_a_run_that_ends_resets_the_count_of_unfinished_claims(queue: Queue,
                                                               clock: Clock) -> None:
    """Deaths are counted in a row, a lease run out (a dead node of several) too: a
    study that finished between them (a late image analysed again) starts from nought."""
    queue.intake.record_instance(received("1.1"))
    queue.mark_ready(0)
    for _ in range(2):
        assert queue.claim("w1", 60, max_claims=3) is not None
        clock.advance(61)  # its node died: the lease runs out
    claim = queue.claim("w2", 60, max_claims=3)
    assert claim is not None  # a third claim after two deaths
    assert queue.finish(claim, "w2", [], []) == StudyState.DONE
    queue.intake.record_instance(received("1.2"))
    queue.mark_ready(0)
    for _ in range(2):
        assert queue.claim("w1", 60, max_claims=3) is not None
        clock.advance(61)
    assert queue.claim("w3", 60, max_claims=3) is not None  # two deaths, not four


def test_the_study_list_can_be_limited_to_the_studies_recorded_last(queue: Queue) -> None:
    """`fractured status` lists the latest studies, not a database's whole history:
    with a limit, the last ones recorded, oldest first, with their own delivery counts."""
    for n in range(5):
        queue.intake.record_instance(received(f"9.{n}.1", f"9.{n}"))
    queue.mark_ready(0)
    while (claim := queue.claim("w1", 60)) is not None:
        queue.finish(claim, "w1", [ResultObject(f"{claim.study_instance_uid}.9", "1.2",
                                                Path("/r/x.dcm"))], ["PACS"])
    for item in queue.take_due_deliveries("n1", lease_s=60):
        queue.record_attempt(item, status=0, error=None, retry_in_s=1, max_attempts=3)
    every = reports.studies(queue.engine)
    assert [r["study_instance_uid"] for r in every] == [f"9.{n}" for n in range(5)]
    last = reports.studies(queue.engine, limit=2)
    assert last == every[-2:] and all(r["delivered"] == 1 for r in last)
    assert reports.studies(queue.engine, limit=0) == []
