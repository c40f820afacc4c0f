"""Keeping a claim alive while the work it covers goes on.

A claimed study, and deliveries a node took to send, are held for [worker].lease_s: a
node that dies leaves them to the others once that has passed. Work that takes longer
(a large study on CPU, a slow PACS answering each C-STORE after a minute) would lose
its claim to another node that then does the same work again; a `Renewal` extends the
lease on a thread of its own every third of it until the work ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from fractured import log

#: Renew when this share of a lease has passed: two renewals may fail (a database
#: restarting) before the lease runs out.
RENEW_EVERY = 1 / 3

_log = log.get("fractured.leases")


class Renewal:
    """Calls `renew` every `lease_s * RENEW_EVERY` seconds from `with` until its end.

    `renew` returns whether the claim is still held; once it is not (the work was
    committed, or another node took it over), renewal stops: the work's own commit
    tells which, and says so. An error inside `renew` (the database unreachable for a
    moment) is logged with `context` and the next turn tries again.
    """

    def __init__(self, renew: Callable[[], bool], lease_s: float, **context: Any) -> None:
        self._renew = renew
        self._every_s = lease_s * RENEW_EVERY
        self._context = context
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)

    def __enter__(self) -> Renewal:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self._every_s):
            try:
                held = self._renew()
            except Exception as exc:
                _log.warning("lease.renewal_failed", error=str(exc), **self._context)
                continue
            if not held:
                return
