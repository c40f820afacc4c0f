"""C-STORE service class user: sends result objects to a destination (usually the PACS).

One association per destination per batch, proposing exactly the presentation contexts
the batch needs. Each object's outcome is returned separately, so a peer that refuses
one object does not hold back the others.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import UID, ImplicitVRLittleEndian
from pynetdicom import AE

from fractured import log
from fractured.config import DeliverySettings, Destination, Settings
from fractured.daemon import tls
from fractured.daemon.leases import Renewal
from fractured.daemon.metrics import NodeMetrics
from fractured.daemon.queue import PendingDelivery, Queue
from fractured.daemon.states import DeliveryState

SUCCESS = 0x0000
#: Warning statuses (PS3.4 B.2.3): the peer stored the object, with a remark.
WARNINGS = frozenset({0x0001, 0xB000, 0xB006, 0xB007})
#: Failure: Duplicate SOP Instance (PS3.7 C.4.2): the peer already holds this object,
#: which for a result the node made is the one it sent before (a response lost to a
#: timeout or an abort, then the object sent again): delivered, with a warning.
ALREADY_STORED = 0x0111
#: Failures that say the peer examined this object and will not take it, whenever it is
#: sent (PS3.4 B.2.3, PS3.7 C.4): resending the same bytes brings the same answer, so
#: the delivery becomes a dead letter at once instead of after max_attempts retries over
#: hours. `fractured retry` sends it again once the PACS is reconfigured.
PERMANENT_FAILURES = frozenset({
    0x0117,  # Invalid SOP Instance
    0x0122,  # Refused: SOP Class not supported
    0x0124,  # Refused: Not authorized
})
#: Ranges of permanent failures by their high byte: 0xA9xx Error: Data Set does not
#: match SOP Class; 0xCxxx Error: Cannot understand. Out of Resources (0xA7xx) and
#: processing failures (0x0110) may pass: they are retried.
_PERMANENT_RANGES = ((0xA900, 0xA9FF), (0xC000, 0xCFFF))

_log = log.get("fractured.sender")


def is_permanent_failure(status: int) -> bool:
    """Whether a C-STORE failure status refuses the object itself (see PERMANENT_FAILURES)."""
    return status in PERMANENT_FAILURES or any(low <= status <= high
                                               for low, high in _PERMANENT_RANGES)


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int | None
    error: str | None  # None when the peer stored the object
    #: The peer refused this object for good (is_permanent_failure): no retry.
    permanent: bool = False


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
        ae.add_requested_context(sop_class, proposed_syntaxes(syntax))
    outcomes: dict[Path, SendOutcome] = {
        path: SendOutcome(path, None, f"unreadable result file: {ds}")
        for path, ds in datasets if isinstance(ds, Exception)}
    readable = [(p, ds) for p, ds in datasets if not isinstance(ds, Exception)]
    if readable:
        context = tls.destination_context(destination)
        server_name = destination.server_name or destination.host
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=None if context is None else (context, server_name))
        # A PACS that does not take a SOP class rejects its presentation context: say so,
        # whether or not the association went ahead for the other objects.
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        refused = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts} - accepted
        peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
        for path, ds in readable:
            if str(ds.SOPClassUID) in refused:
                outcomes[path] = SendOutcome(
                    path, None, f"{peer} refuses {ds.SOPClassUID.name} objects (presentation "
                                "context rejected)")
        sendable = [(path, ds) for path, ds in readable if path not in outcomes]
        if not assoc.is_established:
            reason = f"association rejected by {peer}" if assoc.is_rejected else (
                f"no association by {peer}")
            if context is not None and not assoc.is_rejected:
                failure = tls.handshake_error(context, destination.host, destination.port,
                                              server_name, timeout_s)
                reason += f" ({failure})" if failure else ""
            for path, _ in sendable:
                outcomes[path] = SendOutcome(path, None, reason)
        else:
            try:
                for path, ds in sendable:
                    outcomes[path] = _store(assoc, path, ds)
            finally:
                assoc.release()
    return [outcomes[p] for p in paths]


def proposed_syntaxes(syntax: str) -> list[str]:
    """The file's own transfer syntax and, for an uncompressed one, Implicit VR Little
    Endian too: the one every SCP must accept (PS3.5 10.1), for a PACS that takes
    nothing else; pynetdicom re-encodes between uncompressed syntaxes as it sends."""
    if UID(syntax).is_compressed or syntax == ImplicitVRLittleEndian:
        return [syntax]
    return [syntax, ImplicitVRLittleEndian]


def _store(assoc, path: Path, ds) -> SendOutcome:  # type: ignore[no-untyped-def]
    try:
        rsp = assoc.send_c_store(ds)
    except Exception as exc:  # e.g. no accepted presentation context for the SOP class
        return SendOutcome(path, None, str(exc))
    if "Status" not in rsp:
        return SendOutcome(path, None, "no response (timeout or aborted association)")
    status = int(rsp.Status)
    if status in (SUCCESS, ALREADY_STORED) or status in WARNINGS:
        return SendOutcome(path, status, None)
    if is_permanent_failure(status):
        return SendOutcome(path, status, f"refused with status 0x{status:04X} (permanent: "
                           "not retried)", permanent=True)
    return SendOutcome(path, status, f"refused with status 0x{status:04X}")


def retry_delay(attempts: int, settings: DeliverySettings,
                rng: random.Random | None = None) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: exponential, capped, with
    jitter (see DeliverySettings)."""
    base = min(settings.max_retry_interval_s,
               settings.retry_interval_s * 2.0 ** max(attempts - 1, 0))
    return base * (rng or random).uniform(1.0 - settings.jitter, 1.0 + settings.jitter)


def deliver_due(queue: Queue, settings: Settings, metrics: NodeMetrics, node: str) -> int:
    """Send every delivery that is due, one association per destination; returns how many.

    They are taken by `node` (the worker id, daemon.worker.node_identity) for
    [worker].lease_s, renewed while the sending goes on: other nodes sharing the database
    leave them alone meanwhile (Queue.take_due_deliveries), and an attempt of ours that
    comes after another node took a delivery over is not recorded.
    """
    lease_s = settings.worker.lease_s
    due = queue.take_due_deliveries(node, lease_s)
    if not due:
        return 0
    by_destination: dict[str, list[PendingDelivery]] = {}
    for item in due:
        by_destination.setdefault(item.destination, []).append(item)
    known = {d.name: d for d in settings.destinations}
    with Renewal(lambda: queue.renew_deliveries(due, lease_s) > 0, lease_s,
                 deliveries=len(due)):
        for name, items in by_destination.items():
            destination = known.get(name)
            if destination is None:
                outcomes = [SendOutcome(i.path, None, f"destination {name!r} is no longer "
                                        "configured") for i in items]
            else:
                outcomes = send(settings.node.ae_title, destination,
                                [i.path for i in items], settings.node.network_timeout_s)
            for item, outcome in zip(items, outcomes, strict=True):
                _record(queue, settings, metrics, name, item, outcome)
    return len(due)


def _record(queue: Queue, settings: Settings, metrics: NodeMetrics, name: str,
            item: PendingDelivery, outcome: SendOutcome) -> None:
    """Record one attempt, count it and log it."""
    attempt = item.attempts + 1
    delay = retry_delay(attempt, settings.delivery)
    state = queue.record_attempt(item, status=outcome.status, error=outcome.error,
                                 retry_in_s=delay,
                                 max_attempts=(attempt if outcome.permanent else
                                               settings.delivery.max_attempts),
                                 on_study_done=metrics.study_delivered)
    context = {"destination": name, "sop_class_uid": item.sop_class_uid,
               "attempt": attempt, "status": outcome.status,
               "state": None if state is None else str(state)}
    if state is None:
        metrics.delivery_attempt("taken_over")
        _log.warning("delivery.taken_over", error=outcome.error,
                     detail="another node took this delivery over after our hold ran "
                     "out; its attempt counts, ours is not recorded", **context)
    elif outcome.error is None:
        metrics.delivery_attempt("done")
        _log.info("delivery.sent", warning=outcome.status != SUCCESS, **context)
    elif state == DeliveryState.FAILED:
        metrics.delivery_attempt("dead_letter")
        _log.error("delivery.dead_letter", error=outcome.error,
                   permanent=outcome.permanent, **context)
    else:
        metrics.delivery_attempt("retry")
        _log.warning("delivery.failed", error=outcome.error,
                     retry_in_s=round(delay, 1), **context)
