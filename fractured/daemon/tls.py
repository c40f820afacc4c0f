"""DICOM TLS for the listener and the sender (PS3.15 Annex B, the BCP 195 profile DCMTK
defaults to): TLS 1.2 or later, and on TLS 1.2 only the forward-secret AEAD suites BCP
195 recommends (ECDHE/DHE with AES-GCM or ChaCha20-Poly1305; no CBC, no static RSA).

The context is built when the node starts, so a key that does not match its certificate
or an unreadable CA file stops the node with the key it concerns instead of failing each
association later. The handshake runs in the association's own thread with the network
timeout (HandshakingServer): pynetdicom runs it in its accept loop, where one client that
connects and says nothing would stop every other peer from connecting.
"""

from __future__ import annotations

import functools
import socket
import ssl
import threading
from collections.abc import Callable
from datetime import datetime

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer

from fractured import log
from fractured.config import ConfigError, Destination, TlsSettings
from fractured.daemon import limits
from fractured.daemon.metrics import NodeMetrics

_log = log.get("fractured.tls")

#: OpenSSL's names for BCP 195's recommended TLS 1.2 suites; TLS 1.3's are all AEAD and
#: are not affected by this list.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!DSS:!aNULL"


def bcp195_context(purpose: int) -> ssl.SSLContext:
    """A server or client context (`ssl.PROTOCOL_TLS_SERVER` / `_CLIENT`) restricted to
    BCP 195: TLS 1.2 or later, BCP195_CIPHERS on TLS 1.2."""
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    return context


def server_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when [tls] is off."""
    if not tls.enabled:
        return None
    assert tls.certificate is not None and tls.private_key is not None  # config._check_tls
    context = bcp195_context(ssl.PROTOCOL_TLS_SERVER)
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


def client_context(destination: Destination, where: str) -> ssl.SSLContext | None:
    """The sender's TLS context for `destination`, or None when its tls is off: the peer's
    certificate is verified (against ca_file, else the system's CAs) and must name
    server_name or host. `where` names the destination's config table in errors."""
    if not destination.tls:
        return None
    context = bcp195_context(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname on
    try:
        if destination.ca_file is not None:
            context.load_verify_locations(cafile=destination.ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{where}.ca_file: not a PEM CA certificate file ({exc})") from None
    if destination.certificate is not None and destination.private_key is not None:
        try:
            context.load_cert_chain(destination.certificate, destination.private_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}.certificate / {where}.private_key: cannot be used "
                              f"together ({exc})") from None
    return context


@functools.cache
def destination_context(destination: Destination) -> ssl.SSLContext | None:
    """client_context for a configured destination, its files read once per process:
    the node checks each at start-up (service.Node) and the sender reuses it for every
    batch, as the listener keeps its context."""
    return client_context(destination, f"[[destinations]] {destination.name!r}")


def handshake_error(context: ssl.SSLContext, host: str, port: int, server_name: str,
                    timeout_s: float) -> str | None:
    """Why a TLS handshake with host:port fails, or None when it succeeds.

    pynetdicom only logs the reason a TLS association could not be set up; the sender
    asks again here, once the association has failed, so that the delivery's error (in
    `fractured status` and the dead letter) names it: an unknown CA, a wrong name.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=server_name):
            return None
    except ssl.SSLCertVerificationError as exc:
        return f"TLS: {exc.verify_message} (certificate of {server_name})"
    except (ssl.SSLError, OSError) as exc:
        return f"TLS: {exc}"


class HandshakingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept loop,
    and connections beyond the limits (daemon.limits) closed as they are accepted."""

    #: Counts refused handshakes; set by start_server before the server accepts.
    metrics: NodeMetrics
    #: Associations served at once ([node].max_associations) and connections taken
    #: from one address; set by start_server.
    max_associations: int
    max_per_peer: int
    #: The accept loop's thread, which the health check watches (daemon.health).
    thread: threading.Thread
    #: Called on every turn of the accept loop (about every 0.5 s, idle or not): the
    #: listener's heartbeat for the node's watchdog (daemon.liveness).
    on_turn: Callable[[], None] | None = None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        #: Connections taken whose association has not started yet, by their address.
        self._pending: dict[object, str] = {}
        self._pending_lock = threading.Lock()

    def service_actions(self) -> None:
        super().service_actions()
        if self.on_turn is not None:
            self.on_turn()

    def verify_request(self, request, client_address) -> bool:  # type: ignore[no-untyped-def]
        """Take a connection only within the limits, counting those accepted whose
        association has not started yet, before any thread is made for it."""
        address = str(client_address[0])
        with self._pending_lock:
            # an association whose connection is still pending is counted once, there;
            # one whose connection has closed (a port probe, its thread ending) not at all
            running = [str(assoc.requestor.address) for assoc in self.ae.active_associations
                       if (sock := getattr(assoc.dul.socket, "socket", None)) is not None
                       and sock not in self._pending
                       and not (assoc.is_aborted or assoc.is_released)]
            taken = running + list(self._pending.values())
            reason = limits.over_connection_limits(
                taken, address,
                max_connections=limits.CONNECTIONS_PER_ASSOCIATION * self.max_associations,
                max_per_peer=self.max_per_peer)
            if reason is None:
                self._pending[request] = address
                return True
        self.metrics.association_rejected(reason)
        _log.warning("association.rejected", reason=reason, address=address,
                     connections=len(taken), from_peer=taken.count(address),
                     starting=len(self._pending))
        return False

    def get_request(self):  # type: ignore[no-untyped-def]
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request, client_address):  # type: ignore[no-untyped-def]
        try:
            self._handshake_then_serve(request, client_address)
        finally:  # its association's thread runs now, or never will
            with self._pending_lock:
                del self._pending[request]

    def _handshake_then_serve(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
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
                 evt_handlers: list, metrics: NodeMetrics, max_per_peer: int,
                 on_turn: Callable[[], None] | None = None) -> HandshakingServer:
    """AE.start_server(block=False), with HandshakingServer as the server class and
    LimitedRequestHandler making each association (daemon.limits)."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=HandshakingServer,
                            request_handler=limits.LimitedRequestHandler)
    server.metrics = metrics
    server.max_associations = ae.maximum_associations
    server.max_per_peer = max_per_peer
    server.on_turn = on_turn
    ae._servers.append(server)  # as AE.start_server does: server.shutdown() expects it
    stamp = datetime.now().strftime("%Y%m%d%H%M%S")
    server.thread = threading.Thread(target=server.serve_forever,
                                     name=f"AcceptorServer@{stamp}", daemon=True)
    server.thread.start()
    return server
