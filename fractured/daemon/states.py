"""The study and delivery state machines, as tables: (state, event) -> next state.

Every change of a study's or a delivery's state in the queue is one of these
transitions: the queue takes the states an event may leave from the table (the WHERE of
its compare-and-set updates) and the state it leads to, so a transition the table does
not hold cannot happen, and a reader finds the whole machine here rather than in the
queries. Two guards live beside the table, in the queue: a PROCESSING study is claimed
again only once its worker's lease ran out, and a run finishes only for the worker that
holds it. `markdown` renders the tables for docs/architecture.md (a test keeps the two
equal), in the spirit of pynetdicom's association state machine table.
"""

from __future__ import annotations

import enum
import types
from collections.abc import Mapping
from typing import TypeVar


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    DELIVERING = "delivering"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class StudyEvent(enum.StrEnum):
    """What happens to a study (the value says it in words, for the docs)."""

    IMAGE_RECEIVED = "an image is received"
    QUIET = "no image for the quiet period"
    CLAIMED = "a worker claims it"
    RELEASED = "its worker stops"
    NOTHING_TO_ANALYSE = "no image to analyse"
    QUEUED = "results written and queued"
    NOTHING_TO_SEND = "results written, no destination"
    LATE_IMAGES = "the run ends after images arrived"
    PROCESSING_FAILED = "the run fails"
    ABANDONED = "its worker died on it [worker].max_claims times"
    DELIVERED = "every delivery of its run is done"
    GAVE_UP = "a delivery gave up"
    REQUEUED = "an operator retries its dead letters"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class DeliveryEvent(enum.StrEnum):
    SENT = "the C-STORE succeeded"
    RETRY = "an attempt failed, attempts left"
    GAVE_UP = "an attempt failed, none left (or the refusal is permanent)"
    REQUEUED = "an operator retries it"


_S, _E = StudyState, StudyEvent
#: Every study transition. A late image re-opens a finished study, so it is analysed
#: with the rest; during a run it leaves the state alone and the run, when it ends,
#: re-opens the study (LATE_IMAGES).
STUDY: Mapping[tuple[StudyState, StudyEvent], StudyState] = types.MappingProxyType({
    **{(state, _E.IMAGE_RECEIVED): _S.RECEIVING for state in _S if state is not _S.PROCESSING},
    (_S.PROCESSING, _E.IMAGE_RECEIVED): _S.PROCESSING,
    (_S.RECEIVING, _E.QUIET): _S.READY,
    (_S.READY, _E.CLAIMED): _S.PROCESSING,
    (_S.PROCESSING, _E.CLAIMED): _S.PROCESSING,  # only once the lease ran out
    (_S.PROCESSING, _E.RELEASED): _S.READY,
    (_S.PROCESSING, _E.NOTHING_TO_ANALYSE): _S.SKIPPED,
    (_S.PROCESSING, _E.QUEUED): _S.DELIVERING,
    (_S.PROCESSING, _E.NOTHING_TO_SEND): _S.DONE,
    (_S.PROCESSING, _E.LATE_IMAGES): _S.RECEIVING,
    (_S.PROCESSING, _E.PROCESSING_FAILED): _S.FAILED,
    (_S.READY, _E.ABANDONED): _S.FAILED,  # released by its restarted node
    (_S.PROCESSING, _E.ABANDONED): _S.FAILED,  # its lease ran out
    (_S.DELIVERING, _E.DELIVERED): _S.DONE,
    (_S.DELIVERING, _E.GAVE_UP): _S.FAILED,
    (_S.FAILED, _E.REQUEUED): _S.DELIVERING,
})

_D, _DE = DeliveryState, DeliveryEvent
#: Every delivery transition.
DELIVERY: Mapping[tuple[DeliveryState, DeliveryEvent], DeliveryState] = (
    types.MappingProxyType({
        (_D.PENDING, _DE.SENT): _D.DONE,
        (_D.PENDING, _DE.RETRY): _D.PENDING,
        (_D.PENDING, _DE.GAVE_UP): _D.FAILED,
        (_D.FAILED, _DE.REQUEUED): _D.PENDING,
    }))

#: Study events that come from outside the node's own work (a sender, an operator).
EXTERNAL = frozenset({_E.IMAGE_RECEIVED, _E.REQUEUED})


class TransitionError(ValueError):
    """An event the table does not allow in a state."""


State = TypeVar("State", StudyState, DeliveryState)
Event = TypeVar("Event", StudyEvent, DeliveryEvent)


def next_state(table: Mapping[tuple[State, Event], State], state: State,
               event: Event) -> State:
    """The state `event` leads to from `state`; TransitionError where it may not happen."""
    try:
        return table[state, event]
    except KeyError:
        raise TransitionError(f"{event.name} cannot happen to a {state} "
                              f"{'study' if isinstance(state, StudyState) else 'delivery'}"
                              ) from None


def sources(table: Mapping[tuple[State, Event], State], event: Event) -> tuple[State, ...]:
    """The states `event` may happen in, in their enum's order."""
    return tuple(state for state, happened in table if happened is event)


def only_target(table: Mapping[tuple[State, Event], State], event: Event) -> State:
    """The one state `event` leads to from every state it may happen in (for a single
    UPDATE over all of them); ValueError where they differ."""
    targets = {target for (_, happened), target in table.items() if happened is event}
    if len(targets) != 1:
        raise ValueError(f"{event.name} leads to {sorted(targets)}, not one state")
    return targets.pop()


#: Studies whose next step needs something from outside (a late image, an operator's
#: retry): finished, for retention and `fractured status`.
SETTLED: tuple[StudyState, ...] = tuple(
    state for state in StudyState
    if all(event in EXTERNAL for (source, event) in STUDY if source is state))


def markdown() -> str:
    """Both tables as Markdown, as docs/architecture.md shows them."""
    lines = ["| Study state | Event | Next state |", "| --- | --- | --- |"]
    lines += [f"| {state} | {event} | {target} |" for (state, event), target in STUDY.items()]
    lines += ["", "| Delivery state | Event | Next state |", "| --- | --- | --- |"]
    lines += [f"| {state} | {event} | {target} |"
              for (state, event), target in DELIVERY.items()]
    return "\n".join(lines) + "\n"
