"""What one peer may take of the listener: connections, PDU and object sizes.

pynetdicom gives each TCP connection its threads before it checks
`max_associations`, reads a PDU of whatever length its header states into memory,
and buffers a data set with no cap; `network_timeout` fires only on silence. So a peer
sending a byte every minute could hold every slot, and one never sending the last
fragment of a data set could grow the node's memory until the OOM killer acts.

- Connections are counted when accepted, before any thread: beyond
  `[node].max_connections_per_peer` from one address, or CONNECTIONS_PER_ASSOCIATION
  times `[node].max_associations` in all, the connection is closed at once
  (`association.rejected`, reasons `too_many_connections_from_peer`,
  `too_many_connections`). Up to that, an association over `max_associations` is
  still answered with pynetdicom's transient rejection, which a peer retries.
- A PDU longer than the node offers (MAXIMUM_PDU_BYTES, sent in its A-ASSOCIATE-AC; a
  peer must keep to it, PS3.8 9.3.3.3) closes the connection before it is read.
- A data set over `[node].max_object_mb` that ends within twice that is received and
  answered with a failure status (daemon.scp: 0xA700, `object_too_large`); one still
  growing past twice the limit (a peer that never sends the last fragment) aborts its
  association (`association.aborted`, reason `object_too_large`). pynetdicom holds a
  data set in memory until its last fragment: twice the limit is what one association
  may hold.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import weakref
from typing import TYPE_CHECKING, Any

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.transport import AssociationSocket, RequestHandler

from fractured import log
from fractured.daemon.metrics import NodeMetrics

if TYPE_CHECKING:
    from pynetdicom.association import Association

#: The longest PDU the node accepts (its Maximum Length Received): large enough that a
#: radiograph arrives in a few, small enough that reading one is no burden.
MAXIMUM_PDU_BYTES = 4 << 20

#: Connections taken at once, as a multiple of [node].max_associations: those over
#: max_associations are answered with a transient rejection, the rest closed unread.
CONNECTIONS_PER_ASSOCIATION = 2

#: An association's data set in progress is aborted past this many times
#: [node].max_object_mb; up to it, it is answered with a failure status.
ABORT_FACTOR = 2

#: Message control header bits of a presentation data value (PS3.8 E.2).
_COMMAND = 0x01
_LAST_FRAGMENT = 0x02

_log = log.get("fractured.limits")


class LimitedSocket(AssociationSocket):
    """An association's socket that refuses to read a PDU longer than `max_pdu_bytes`:
    the connection is closed instead (pynetdicom then sees it closed, Evt17)."""

    max_pdu_bytes: int = MAXIMUM_PDU_BYTES

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.max_pdu_bytes:
            _log.warning("association.aborted", reason="pdu_too_large", pdu_bytes=nr_bytes,
                         limit=self.max_pdu_bytes, address=str(self.assoc.requestor.address))
            self.close()
            return bytearray()
        return super().recv(nr_bytes)


def close_transport(assoc: Association) -> None:
    """Shut the association's connection down, waking a read blocked on it."""
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # closed already
            sock.shutdown(socket.SHUT_RDWR)


class LimitedRequestHandler(RequestHandler):
    """pynetdicom's request handler, with a LimitedSocket for each association."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # The socket pynetdicom just made becomes a LimitedSocket (a subclass adding no
        # state) before the association's thread reads from it: making a second one
        # would announce the connection to the state machine twice (Evt5).
        assoc.dul.socket.__class__ = LimitedSocket
        return assoc


class ObjectSizeLimit:
    """Counts the data set bytes of the message each association is receiving and
    aborts the association once they pass ABORT_FACTOR times `max_bytes`."""

    def __init__(self, max_bytes: int, metrics: NodeMetrics) -> None:
        self.max_bytes = max_bytes * ABORT_FACTOR
        self._metrics = metrics
        self._received: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        # abort() is asynchronous: PDUs the association had read before it still arrive,
        # and must neither count again nor abort (and log, and count) a second time
        self._aborted: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def handlers(self) -> list[tuple[evt.NotificationEvent, object, list]]:
        return [(evt.EVT_PDU_RECV, self._pdu_received, [])]

    def _pdu_received(self, event: Event) -> None:
        pdu = event.pdu  # type: ignore[attr-defined]
        if not isinstance(pdu, P_DATA_TF):
            return
        assoc = event.assoc
        with self._lock:
            if assoc in self._aborted:
                return
            size = self._received.get(assoc, 0)
            for item in pdu.presentation_data_value_items:
                data = item.data or b""
                if not data or data[0] & _COMMAND:
                    continue
                size += len(data) - 1
                if size > self.max_bytes:
                    break
                if data[0] & _LAST_FRAGMENT:
                    size = 0  # the data set is whole: the next message starts afresh
            self._received[assoc] = size
            if size > self.max_bytes:
                self._aborted.add(assoc)
        if size > self.max_bytes:
            self._metrics.instance_rejected("object_too_large")
            _log.warning("association.aborted", reason="object_too_large",
                         received_bytes=size, limit_bytes=self.max_bytes,
                         calling_ae=str(assoc.requestor.ae_title).strip(),
                         address=str(assoc.requestor.address))
            assoc.abort(block=False)


def over_connection_limits(taken: list[str], address: str, *, max_connections: int,
                           max_per_peer: int) -> str | None:
    """Why one more connection from `address` may not be taken, or None. `taken` holds
    the address of each connection taken and not closed yet: running associations and
    those not started yet (a TLS handshake, a thread starting)."""
    if len(taken) >= max_connections:
        return "too_many_connections"
    if taken.count(address) >= max_per_peer:
        return "too_many_connections_from_peer"
    return None
