"""Structured logging: JSON lines for journald, readable lines on a terminal.

Events are short snake_case names with key/value context (`store.accepted`,
`study.ready`), so they can be counted and searched. Patient identifiers are never
logged at INFO; only UIDs, which identify objects, not people.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog

from fractured import privacy


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto") -> None:
    """Route structlog and the standard library (pynetdicom, apscheduler) to stderr."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler.setFormatter(JournalPriority(formatter) if writes_to_journal() else formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # library warnings become log lines, not stray stderr
    privacy.keep_values_out_of_logs()  # ...but none that quotes a patient's value
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO: pynetdicom logs every PDU (with patient details
    # in its dataset dumps), highdicom every module it copies, APScheduler every skipped
    # tick of a job still running (by design: max_instances=1), Alembic its database
    # dialect at every start. Our own events say what matters (database.upgraded).
    for name, floor in (("pynetdicom", logging.WARNING), ("highdicom", logging.WARNING),
                        ("apscheduler", logging.ERROR), ("alembic", logging.WARNING)):
        logging.getLogger(name).setLevel(max(floor, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a module's logger used once would otherwise keep this
        # configuration for good, and a later one (a second configure, structlog's
        # capture_logs in the tests) would not reach it. The node logs a few events a
        # second at most, so the per-call lookup costs nothing measurable.
        cache_logger_on_first_use=False,
    )


#: syslog priorities (sd-daemon(3)) of the standard library's levels
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))


def writes_to_journal() -> bool:
    """Whether stderr is systemd's journal stream: systemd names it in $JOURNAL_STREAM
    (device:inode) for a service's stdout/stderr, and a redirected stderr no longer
    matches."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


class JournalPriority(logging.Formatter):
    """Prefixes each line with its syslog priority (`<4>` for a warning), which journald
    reads (SyslogLevelPrefix=yes, systemd's default) so `journalctl -p warning` filters
    the node's events; without it every line is filed at the stream's one priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in _PRIORITIES if record.levelno >= level), 7)
        return f"<{priority}>{self._inner.format(record)}"


def get(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
