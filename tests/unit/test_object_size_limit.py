"""ObjectSizeLimit aborts an association whose data set grows past its limit, once.

`Association.abort(block=False)` returns before the association stops: PDUs it had
already read still reach the handler. They must not count towards a second abort,
which on a loaded machine logged and counted the same rejection twice (seen in
tests/integration/test_limits.py's never-ending data set).
"""

from __future__ import annotations

from types import SimpleNamespace

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

from fractured.daemon.limits import ObjectSizeLimit
from fractured.daemon.metrics import NodeMetrics


class Peer:
    """What the limit reads of an association, and the aborts asked of it."""

    def __init__(self) -> None:
        self.requestor = SimpleNamespace(ae_title="ENDLESS", address="127.0.0.1")
        self.aborts = 0

    def abort(self, block: bool = True) -> None:
        self.aborts += 1


def fragment(size: int, *, last: bool = False) -> P_DATA_TF:
    """A P-DATA-TF with one data set fragment of `size` bytes."""
    item = PresentationDataValueItem()
    item.presentation_context_id = 1
    item.presentation_data_value = bytes([0x02 if last else 0x00]) + bytes(size)
    pdu = P_DATA_TF()
    pdu.presentation_data_value_items = [item]
    return pdu


def rejected(metrics: NodeMetrics) -> float:
    return metrics.registry.get_sample_value("fractured_instances_rejected_total",
                                             {"reason": "object_too_large"}) or 0.0


def test_a_growing_data_set_is_aborted_once_whatever_arrives_after() -> None:
    metrics = NodeMetrics()
    limit = ObjectSizeLimit(1 << 20, metrics)  # 1 MB: aborted past twice that
    (_, handler, _), = limit.handlers()
    peer = Peer()
    for _ in range(20):  # 5 MB in 256 KB fragments, none the last
        handler(Event(peer, evt.EVT_PDU_RECV, {"pdu": fragment(256 << 10)}))
    assert peer.aborts == 1 and rejected(metrics) == 1


def test_whole_data_sets_under_the_limit_are_never_aborted() -> None:
    metrics = NodeMetrics()
    (_, handler, _), = ObjectSizeLimit(1 << 20, metrics).handlers()
    peer = Peer()
    for _ in range(40):  # 40 objects of 1.5 MB each: 60 MB on one association
        for last in (False, False, True):
            handler(Event(peer, evt.EVT_PDU_RECV, {"pdu": fragment(512 << 10, last=last)}))
    assert peer.aborts == 0 and rejected(metrics) == 0
