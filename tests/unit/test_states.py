"""The study and delivery state machines: the tables of daemon.states, and the copy of
them in docs/architecture.md."""

from __future__ import annotations

import itertools
import re

import pytest

from fractured.daemon import states
from fractured.daemon.states import (
    DELIVERY,
    SETTLED,
    STUDY,
    DeliveryEvent,
    DeliveryState,
    StudyEvent,
    StudyState,
    TransitionError,
    next_state,
    only_target,
    sources,
)
from tests.paths import REPO

ARCHITECTURE = REPO / "docs" / "architecture.md"


@pytest.mark.parametrize(("table", "state_type", "event_type"), [
    (STUDY, StudyState, StudyEvent), (DELIVERY, DeliveryState, DeliveryEvent)])
def test_every_pair_either_moves_as_the_table_says_or_raises(table, state_type,
                                                              event_type) -> None:
    moved = 0
    for state, event in itertools.product(state_type, event_type):
        if (state, event) in table:
            assert next_state(table, state, event) is table[state, event]
            moved += 1
        else:
            with pytest.raises(TransitionError, match=re.escape(event.name)):
                next_state(table, state, event)
    assert moved == len(table)


def test_the_machine_hangs_together() -> None:
    # a late image re-opens a study in any state (and leaves a running one running)
    assert len(sources(STUDY, StudyEvent.IMAGE_RECEIVED)) == len(StudyState)
    # every state is reached from RECEIVING, and every event can happen somewhere
    reached, frontier = {StudyState.RECEIVING}, [StudyState.RECEIVING]
    while frontier:
        state = frontier.pop()
        for (source, _), target in STUDY.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(StudyState)
    assert all(sources(STUDY, event) for event in StudyEvent)
    assert all(sources(DELIVERY, event) for event in DeliveryEvent)
    # what retention and status call finished: only a sender or an operator moves it on
    assert SETTLED == (StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED)
    # the queue's single UPDATEs need one target per event; a late image has two
    assert only_target(STUDY, StudyEvent.CLAIMED) is StudyState.PROCESSING
    with pytest.raises(ValueError, match="IMAGE_RECEIVED leads to"):
        only_target(STUDY, StudyEvent.IMAGE_RECEIVED)


def test_the_architecture_shows_the_tables_as_they_are() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    shown = text.split("<!-- states:begin -->\n")[1].split("<!-- states:end -->")[0]
    assert shown == states.markdown(), ("docs/architecture.md is out of date: paste "
                                        "fractured.daemon.states.markdown() between its "
                                        "states markers")
