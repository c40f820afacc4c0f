"""Heartbeats of the node's loops, so that its watchdog ping means "alive", not merely
"the watchdog thread runs".

Each loop that must keep turning for the node to work beats as it goes round: the main
thread's signal poll, a scheduler job (the scheduler's own loop and its job threads),
the listener's accept loop. A process with a deadlocked or hung loop still has a
watchdog thread happy to ping; with heartbeats the pings stop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

#: A loop that should turn every second or so counts as wedged only after this many
#: seconds without a beat (or the watchdog timeout, when longer): on two loaded cores
#: a loop can be late by seconds without being stuck.
STALE_AFTER_MIN_S = 10.0

MAIN_LOOP = "main_loop"
SCHEDULER = "scheduler"
LISTENER = "listener"


class Heartbeats:
    """When each named loop last went round (monotonic time)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._last = dict.fromkeys(names, time.monotonic())

    def reset(self) -> None:
        """Count every loop as just beaten: for when they start turning."""
        now = time.monotonic()
        for name in self._last:
            self._last[name] = now

    def beat(self, name: str) -> None:
        self._last[name] = time.monotonic()

    def stale(self, older_than_s: float) -> list[str]:
        """The loops that have not beaten for more than `older_than_s` seconds."""
        now = time.monotonic()
        return sorted(n for n, last in self._last.items() if now - last > older_than_s)
