"""DICOM TLS for the listener (PS3.15 Annex B, the BCP 195 profile DCMTK defaults to).

The context is built when the node starts, so a key that does not match its certificate
or an unreadable CA file stops the node with the key it concerns instead of failing each
association later. The handshake runs in the association's own thread with the network
timeout (HandshakingServer): pynetdicom runs it in its accept loop, where one client that
connects and says nothing would stop every other peer from connecting.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from datetime import datetime

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from fractured import log
from fractured.config import ConfigError, TlsSettings
from fractured.daemon.metrics import NodeMetrics

_log = log.get("fractured.tls")


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when [tls] is off."""
    if not tls.enabled:
        return None
    assert tls.certificate is not None and tls.private_key is not None  # config._check_tls
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195: TLS 1.2 or later
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"[tls].certificate / [tls].private_key: cannot be used "
                          f"together ({exc})") from None
    if tls.client_ca is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"[tls].client_ca: not a PEM CA certificate file ({exc})"
                              ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HandshakingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop."""

    #: Counts refused handshakes; set by start_server before the server accepts.
    metrics: NodeMetrics
    #: The accept loop's thread, which the health check watches (daemon.health).
    thread: threading.Thread
    #: Called on every turn of the accept loop (about every 0.5 s, idle or not): the
    #: listener's heartbeat for the node's watchdog (daemon.liveness).
    on_turn: Callable[[], None] | None = None

    def service_actions(self) -> None:
        super().service_actions()
        if self.on_turn is not None:
            self.on_turn()

    def get_request(self):  # type: ignore[no-untyped-def]
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request, client_address):  # type: ignore[no-untyped-def]
        if isinstance(request, ssl.SSLSocket):
            before = request.gettimeout()
            request.settimeout(self.ae.network_timeout)
            try:
                request.do_handshake()
            except (ssl.SSLEOFError, ConnectionResetError):
                # Closed before saying anything: a port probe or a health check.
                _log.debug("connection.closed", reason="before_tls_handshake",
                           address=str(client_address[0]))
                self.shutdown_request(request)
                return
            except OSError as exc:  # a plain-TCP peer, a refused certificate, a timeout
                self.metrics.association_rejected("tls_handshake_failed")
                _log.warning("association.rejected", reason="tls_handshake_failed",
                             address=str(client_address[0]), error=str(exc))
                self.shutdown_request(request)
                return
            request.settimeout(before)
        super().process_request_thread(request, client_address)


def start_server(ae: AE, address: tuple[str, int], ssl_context: ssl.SSLContext | None,
                 evt_handlers: list, metrics: NodeMetrics,
                 on_turn: Callable[[], None] | None = None) -> HandshakingServer:
    """AE.start_server(block=False), with HandshakingServer as the server class."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=HandshakingServer)
    server.metrics = metrics
    server.on_turn = on_turn
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() expects it
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    server.thread = threading.Thread(target=server.serve_forever,
                                     name=f"AcceptorServer@{stamp}", daemon=True)
    server.thread.start()
    return server
