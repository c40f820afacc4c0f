"""Structured logging: JSON lines for journald, readable lines on a terminal.

Events are short snake_case names with key/value context (`store.accepted`,
`study.ready`), so they can be counted and searched. Patient identifiers are never
logged at INFO; only UIDs, which identify objects, not people.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog


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
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # library warnings become log lines, not stray stderr
    root.setLevel(level.upper())
    # Libraries that are chatty at INFO: pynetdicom logs every PDU (with patient details
    # in its dataset dumps), highdicom every module it copies, APScheduler every skipped
    # tick of a job still running (by design: max_instances=1). Our own events say
    # what matters.
    for name, floor in (("pynetdicom", logging.WARNING), ("highdicom", logging.WARNING),
                        ("apscheduler", logging.ERROR)):
        logging.getLogger(name).setLevel(max(floor, root.level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def get(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)
