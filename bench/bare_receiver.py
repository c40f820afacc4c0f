"""The floor of the node's own stack, for bench/ingest.py: a pynetdicom storage SCP
negotiated as the node is (every storage class, every transfer syntax, no PDU limit)
that writes each object as received, with the same file meta and the same durable
write as the node (daemon.scp.spooled_file, fractured.durable), and answers success.
No checks, no database.

    python -m bench.bare_receiver PORT FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, evt
from pynetdicom.events import Event

from fractured.daemon.scp import spooled_file
from fractured.durable import write_durably


def main() -> None:
    port, folder = int(sys.argv[1]), Path(sys.argv[2])

    def store(event: Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        write_durably(folder / f"{uid}.dcm",
                      spooled_file(event, event.assoc.requestor.ae_title))
        return 0x0000

    ae = AE(ae_title="BARE")
    ae.maximum_pdu_size = 0
    ae.maximum_associations = 32
    for context in StoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, store)])


if __name__ == "__main__":
    main()
