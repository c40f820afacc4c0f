"""Our own sd_notify client, so the node can run as a systemd Type=notify service with a
watchdog, without a dependency for one datagram.

The protocol (sd_notify(3)) is one datagram of newline-separated KEY=VALUE lines sent
to the AF_UNIX socket that $NOTIFY_SOCKET names (a leading "@" meaning the abstract
namespace). Outside systemd the variable is unset and every call does nothing, so the
node runs the same from a terminal, a test or a unit. A failed send is logged, never
raised: the service manager's bookkeeping must not take a working node down.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Mapping

from fractured import log

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"

_log = log.get("fractured.systemd")


class Notifier:
    """Sends state changes to the service manager at `address` (None: not under one)."""

    def __init__(self, address: str | None) -> None:
        self.address = address

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """The notifier $NOTIFY_SOCKET asks for; a disabled one when it is unset or names
        a socket kind this client does not speak (logged, as the unit then expects a
        READY=1 that will never come)."""
        raw = environ.get(NOTIFY_SOCKET, "")
        if not raw:
            return cls(None)
        if raw.startswith("@"):
            return cls("\0" + raw[1:])
        if raw.startswith("/"):
            return cls(raw)
        _log.warning("systemd.notify_socket_unsupported", notify_socket=raw,
                     detail="only AF_UNIX socket paths and @abstract names are supported")
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE lines as one datagram; whether the manager got it (False when
        disabled or the send failed)."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall("\n".join(assignments).encode())
        except OSError as exc:
            _log.warning("systemd.notify_failed", message=assignments[0], error=str(exc))
            return False
        return True

    def ready(self, status: str) -> None:
        """The node serves: systemd starts the units ordered after it."""
        if self.send("READY=1", _status(status)):
            _log.info("systemd.ready", status=status)

    def stopping(self, status: str) -> None:
        """A stop began: systemd shows the unit as deactivating, not failed."""
        if self.send("STOPPING=1", _status(status)):
            _log.info("systemd.stopping", status=status)

    def extend_timeout(self, seconds: float, status: str) -> None:
        """Ask for `seconds` more from now: systemd only kills the node once both this
        and the unit's own timeout (TimeoutStopSec= during a stop) have passed."""
        if self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", _status(status)):
            _log.info("systemd.timeout_extended", seconds=seconds, status=status)

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")


def _status(text: str) -> str:
    """A STATUS= line: one line of free text, which systemctl status shows."""
    return "STATUS=" + " ".join(text.split())


def watchdog_timeout(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds systemd waits for a ping before it kills the node ($WATCHDOG_USEC), or
    None when no watchdog is asked of this process: unset, not a positive number, or
    meant for another process ($WATCHDOG_PID)."""
    raw = environ.get(WATCHDOG_USEC, "")
    if not raw:
        return None
    pid = environ.get(WATCHDOG_PID, "")
    if pid and pid != str(os.getpid()):
        _log.debug("watchdog.not_ours", watchdog_pid=pid, pid=os.getpid())
        return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        _log.warning("watchdog.bad_timeout", watchdog_usec=raw,
                     detail="expected a positive number of microseconds; no pings sent")
        return None
    return usec / 1_000_000


class Watchdog:
    """Pings systemd's watchdog (WATCHDOG=1) every half of its timeout, from a thread of
    its own, but only while `wedged()` names nothing.

    A ping vouches for what `wedged` checks, no more: in the node, that its main loop,
    the scheduler's loop and the listener's accept loop each went round recently
    (daemon.liveness). It does not vouch that a study's analysis or a delivery is
    progressing: those are bounded by the worker's lease and the network timeout. When
    something is wedged the pings stop, and systemd kills and restarts the node once the
    timeout passes (Restart=on-failure), which is safe: what was acknowledged is on disk.
    """

    def __init__(self, notifier: Notifier, timeout_s: float,
                 wedged: Callable[[], list[str]]) -> None:
        self.notifier = notifier
        self.timeout_s = timeout_s
        self.wedged = wedged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)

    def start(self) -> None:
        _log.info("watchdog.started", timeout_s=self.timeout_s,
                  ping_every_s=self.timeout_s / 2)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.timeout_s / 2):
            wedged = self.wedged()
            if wedged:
                _log.warning("watchdog.withheld", wedged=wedged,
                             detail="no ping: systemd restarts the node after the timeout")
            elif self.notifier.watchdog():
                _log.debug("watchdog.ping")
