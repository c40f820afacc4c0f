"""The queue on a real PostgreSQL database (tests.postgres): the transitions of
tests/unit/test_queue.py again, and what several nodes sharing one database must not do:
claim one study twice, or send one delivery twice."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from fractured.daemon.connection import make_engine
from fractured.daemon.migrations import prepare
from fractured.daemon.queue import Queue
from fractured.daemon.schema import Study
from tests.postgres import PostgresCluster
from tests.unit.test_queue import (  # noqa: F401  the SQLite tests, collected again here
    Clock,
    clock,
    queue,
    queued_deliveries,
    received,
    state,
    test_a_late_attempt_after_a_takeover_is_not_recorded,
    test_a_late_success_after_a_takeover_is_not_counted_twice,
    test_a_look_at_the_due_deliveries_records_nothing,
    test_a_renewed_study_lease_is_not_taken_over,
    test_an_image_recorded_while_a_run_commits_reopens_the_study,
    test_an_image_recorded_while_the_last_delivery_settles_reopens_the_study,
    test_an_image_stamped_before_the_claim_by_a_clock_behind_still_reopens,
    test_concurrent_first_images_of_one_study_are_all_recorded,
    test_dead_letters_are_listed_and_requeued_by_study_and_destination,
    test_deliveries_taken_by_one_node_are_held_from_the_others,
    test_expired_lease_is_taken_over_and_the_old_run_is_ignored,
    test_failed_delivery_is_retried_then_given_up,
    test_image_arriving_during_processing_reopens_after_the_run,
    test_late_image_reopens_a_done_study,
    test_quiet_period_then_claim_then_deliver_then_done,
    test_renewed_deliveries_stay_held,
    test_restart_starts_the_quiet_period_of_receiving_studies_again,
    test_restarted_worker_releases_its_own_leases,
    test_same_instance_twice_is_one_row,
)


@pytest.fixture
def database_url(postgres: PostgresCluster) -> str:
    """A new, empty PostgreSQL database for each test."""
    return postgres.new_database()


def ready_studies(node: Queue, count: int) -> set[str]:
    """`count` studies of one image each, past their quiet period."""
    for i in range(count):
        node.intake.record_instance(received(f"5.{i}.1", f"5.{i}"))
    assert len(node.mark_ready(0)) == count
    return {f"5.{i}" for i in range(count)}


def test_workers_of_several_nodes_claim_each_study_once(postgres: PostgresCluster) -> None:
    """Four nodes' workers (an engine each, as four processes have) claiming at once."""
    url = postgres.new_database()
    nodes = [Queue(make_engine(url)) for _ in range(4)]
    studies = ready_studies(nodes[0], 40)
    claimed: list[str] = []

    def work(node: Queue, name: str) -> None:
        while (claim := node.claim(name, lease_s=600)) is not None:
            claimed.append(claim.study_instance_uid)

    threads = [threading.Thread(target=work, args=(node, f"w{i}"))
               for i, node in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(claimed) == sorted(studies)  # every study, none twice
    for node in nodes:
        node.close()


def test_a_claim_skips_a_study_another_node_holds_locked(postgres: PostgresCluster) -> None:
    """A study whose row another node has locked (finishing it, or claiming it) is
    passed over at once, not waited for: SKIP LOCKED."""
    url = postgres.new_database()
    moved = Clock()
    node, other = Queue(make_engine(url), moved), Queue(make_engine(url), moved)
    node.intake.record_instance(received("6.1.1", "6.1"))
    moved.advance(1)
    node.intake.record_instance(received("6.2.1", "6.2"))
    node.mark_ready(0)
    got: list[str | None] = []
    with other.engine.begin() as holding:  # the oldest study, locked until this ends
        holding.execute(select(Study.id).where(Study.study_instance_uid == "6.1")
                        .with_for_update())
        claimer = threading.Thread(target=lambda: got.append(
            getattr(node.claim("w1", 600), "study_instance_uid", None)))
        claimer.start()
        claimer.join(60)
        assert got == ["6.2"]
    assert getattr(node.claim("w1", 600), "study_instance_uid", None) == "6.1"
    node.close()
    other.close()


def test_senders_of_several_nodes_send_each_delivery_once(postgres: PostgresCluster) -> None:
    url = postgres.new_database()
    nodes = [Queue(make_engine(url)) for _ in range(4)]
    queued_deliveries(nodes[0], 30)
    sent: list[int] = []

    def send(node: Queue) -> None:
        while items := node.take_due_deliveries("n", lease_s=600, limit=3):
            for item in items:
                sent.append(item.id)
                node.record_attempt(item, status=0, error=None, retry_in_s=0,
                                    max_attempts=3)

    threads = [threading.Thread(target=send, args=(node,)) for node in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(sent) == 30 and len(set(sent)) == 30
    assert state(nodes[0], "1.2.3.4") == "done"
    for node in nodes:
        node.close()


def test_nodes_starting_together_upgrade_the_schema_once(postgres: PostgresCluster) -> None:
    """Four nodes open an empty database at once: under the advisory lock one runs the
    revisions, the others find them done."""
    url = postgres.new_database()
    applied: list[list[str]] = []
    threads = [threading.Thread(target=lambda: applied.append(prepare(make_engine(url))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(applied) == [[], [], [], ["0001", "0002", "0003", "0004"]]
