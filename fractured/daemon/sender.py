"""C-STORE service class user: sends result objects to a destination (usually the PACS).

One association per destination per batch, proposing exactly the presentation contexts
the batch needs. Each object's outcome is returned separately, so a peer that refuses
one object does not hold back the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE

from fractured import log
from fractured.config import Destination, Settings
from fractured.daemon.queue import PendingDelivery, Queue

SUCCESS = 0x0000
#: Warning statuses (PS3.4 B.2.3): the peer stored the object, with a remark.
WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})

_log = log.get("fractured.sender")


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int | None
    error: str | None  # None when the peer stored the object


def send(calling_ae: str, destination: Destination, paths: Sequence[Path],
         timeout_s: float) -> list[SendOutcome]:
    """C-STORE every file to `destination`; one outcome per path, in order."""
    datasets = []
    for path in paths:
        try:
            datasets.append((path, pydicom.dcmread(path)))
        except Exception as exc:
            datasets.append((path, exc))
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                for _, ds in datasets if not isinstance(ds, Exception)}
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    outcomes: dict[Path, SendOutcome] = {
        path: SendOutcome(path, None, f"unreadable result file: {ds}")
        for path, ds in datasets if isinstance(ds, Exception)}
    readable = [(p, ds) for p, ds in datasets if not isinstance(ds, Exception)]
    if readable:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            reason = "association rejected" if assoc.is_rejected else "no association"
            for path, _ in readable:
                outcomes[path] = SendOutcome(
                    path, None, f"{reason} by {destination.ae_title}@"
                                f"{destination.host}:{destination.port}")
        else:
            try:
                for path, ds in readable:
                    outcomes[path] = _store(assoc, path, ds)
            finally:
                assoc.release()
    return [outcomes[p] for p in paths]


def _store(assoc, path: Path, ds) -> SendOutcome:  # type: ignore[no-untyped-def]
    try:
        rsp = assoc.send_c_store(ds)
    except Exception as exc:  # e.g. no accepted presentation context for the SOP class
        return SendOutcome(path, None, str(exc))
    if "Status" not in rsp:
        return SendOutcome(path, None, "no response (timeout or aborted association)")
    status = int(rsp.Status)
    if status == SUCCESS or status in WARNINGS:
        return SendOutcome(path, status, None)
    return SendOutcome(path, status, f"refused with status 0x{status:04X}")


def deliver_due(queue: Queue, settings: Settings) -> int:
    """Send every delivery that is due, one association per destination; returns how many."""
    due = queue.due_deliveries()
    by_destination: dict[str, list[PendingDelivery]] = {}
    for item in due:
        by_destination.setdefault(item.destination, []).append(item)
    known = {d.name: d for d in settings.destinations}
    for name, items in by_destination.items():
        destination = known.get(name)
        if destination is None:
            outcomes = [SendOutcome(i.path, None, f"destination {name!r} is no longer "
                                    "configured") for i in items]
        else:
            outcomes = send(settings.node.ae_title, destination, [i.path for i in items],
                            settings.node.network_timeout_s)
        for item, outcome in zip(items, outcomes, strict=True):
            state = queue.record_attempt(item.id, status=outcome.status, error=outcome.error,
                                         retry_in_s=settings.delivery.retry_interval_s,
                                         max_attempts=settings.delivery.max_attempts)
            event = "delivery.sent" if outcome.error is None else "delivery.failed"
            level = _log.info if outcome.error is None else _log.warning
            level(event, destination=name, sop_class_uid=item.sop_class_uid,
                  attempt=item.attempts + 1, status=outcome.status, error=outcome.error,
                  state=str(state))
    return len(due)
