"""The association audit trail: one structured event per association and per refusal.

`association.ended` says who called (AE title, address), what the association stored
(instances accepted and refused, bytes) and how it ended (released, aborted, or the
connection closed without either), so an administrator can account for every transfer
without reading per-instance events. Rejections the node decides itself are logged
where they are decided (fractured.daemon.access); the ones pynetdicom makes (called AE
title, association limit) are logged here. No patient data: only titles, addresses,
counts.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from fractured import log
from fractured.daemon.metrics import NodeMetrics

SUCCESS = 0x0000

#: pynetdicom's own A-ASSOCIATE-RJ (source, diagnostic) pairs, as `reason` values.
REJECTION_REASONS: dict[tuple[int, int], str] = {
    (0x01, 0x03): "calling_ae_not_recognised",
    (0x01, 0x07): "called_ae_not_recognised",
    (0x02, 0x01): "user_identity_refused",
    (0x03, 0x02): "too_many_associations",
}

_log = log.get("fractured.audit")


@dataclass
class _Tally:
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    accepted: int = 0
    refused: int = 0
    bytes: int = 0


class AssociationAudit:
    """Counts what each live association stores and logs it when the association ends;
    `metrics` counts associations by outcome."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics
        self._tallies: dict[int, _Tally] = {}
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[evt.NotificationEvent, object, list]]:
        return [
            (evt.EVT_ESTABLISHED, self._established, []),
            (evt.EVT_REJECTED, self._rejected, []),
            (evt.EVT_RELEASED, self._ended, ["released"]),
            (evt.EVT_ABORTED, self._ended, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._ended, ["connection_closed"]),
        ]

    def stored(self, assoc: Association, status: int, size: int) -> None:
        """Account one C-STORE answered with `status` (size counts only when stored)."""
        with self._lock:
            tally = self._tallies.get(id(assoc))
            if tally is None:
                return
            if status == SUCCESS:
                tally.accepted += 1
                tally.bytes += size
            else:
                tally.refused += 1

    def _established(self, event: Event) -> None:
        requestor = event.assoc.requestor
        with self._lock:
            self._tallies[id(event.assoc)] = _Tally(str(requestor.ae_title).strip(),
                                                    str(requestor.address))

    def _rejected(self, event: Event) -> None:
        rejection = event.assoc.acceptor.primitive
        key = (rejection.result_source, rejection.diagnostic)
        requestor = event.assoc.requestor
        reason = REJECTION_REASONS.get(key, f"source_{key[0]}_diagnostic_{key[1]}")
        self._metrics.association_rejected(reason)
        _log.warning("association.rejected", reason=reason,
                     calling_ae=str(requestor.ae_title).strip(), address=str(requestor.address))

    def _ended(self, event: Event, outcome: str) -> None:
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is None:  # never established, or already logged by an earlier event
            return
        self._metrics.association_ended(outcome)
        _log.info("association.ended", calling_ae=tally.calling_ae, address=tally.address,
                  outcome=outcome, instances=tally.accepted, refused=tally.refused,
                  bytes=tally.bytes, seconds=round(time.monotonic() - tally.started, 3))
