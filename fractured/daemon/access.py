"""Who may associate: the calling AE allow-list and the addresses each peer may use.

The check runs when an A-ASSOCIATE-RQ arrives (pynetdicom's EVT_REQUESTED), before any
presentation context is negotiated, and answers a refused peer with an A-ASSOCIATE-RJ
(rejected-permanent, service-user, "calling AE title not recognised": PS3.8 9.3.4 has no
reason for a wrong address, and to the peer an AE title from the wrong host is an
unknown one). The log event names the real reason for the administrator.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field
from enum import StrEnum

from pynetdicom import evt
from pynetdicom.events import Event

from fractured import log
from fractured.config import AccessSettings, ConfigError
from fractured.daemon.metrics import NodeMetrics

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A-ASSOCIATE-RJ fields (PS3.8 9.3.4): result, source, reason/diagnostic.
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
CALLING_AE_NOT_RECOGNISED = 0x03

_log = log.get("fractured.access")


class Refusal(StrEnum):
    """Why an association request was refused (the `reason` of `association.rejected`)."""

    CALLING_AE_NOT_ALLOWED = "calling_ae_not_allowed"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"
    #: the peer's client certificate names another holder than its entry's
    CERTIFICATE_NOT_ALLOWED = "certificate_not_allowed"
    #: the check itself failed: the request is refused rather than let through
    ACCESS_CHECK_FAILED = "access_check_failed"


class ClosedByDefault(ConfigError):
    """No peers listed and anyone not explicitly allowed: the node must not start."""


@dataclass(frozen=True)
class AccessPolicy:
    """The allow-list as parsed networks; an empty one lets every peer in, and exists
    only where [access].allow_any says so (`from_settings`)."""

    peers: dict[str, tuple[IPNetwork, ...]]
    #: calling AE title -> the Common Name its client certificate must carry
    certificate_names: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, access: AccessSettings) -> AccessPolicy:
        """The policy of [access]; ClosedByDefault where it lists no peers and does not
        set allow_any."""
        if not access.peers and not access.allow_any:
            raise ClosedByDefault(
                "[access]: no [[access.peers]] are listed, so anyone who can reach the "
                "port could store images and have results sent to the PACS under any "
                "patient. List the PACS (and modalities) that send here as "
                "[[access.peers]] with their addresses, or set allow_any = true in "
                "[access] to let anyone in (a test bench, not a hospital network)")
        return cls({p.ae_title.strip(): tuple(ipaddress.ip_network(a, strict=False)
                                              for a in p.addresses)
                    for p in access.peers},
                   {p.ae_title.strip(): p.certificate_cn for p in access.peers
                    if p.certificate_cn})

    @property
    def open(self) -> bool:
        return not self.peers

    def refusal(self, calling_ae: str, address: str,
                certificate_cn: str | None = None) -> Refusal | None:
        """Why `calling_ae` connecting from `address` (with a client certificate naming
        `certificate_cn`) may not associate, or None."""
        if self.open:
            return None
        networks = self.peers.get(calling_ae.strip())
        if networks is None:
            return Refusal.CALLING_AE_NOT_ALLOWED
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
        if not any(ip in network for network in networks):
            return Refusal.ADDRESS_NOT_ALLOWED
        required = self.certificate_names.get(calling_ae.strip())
        if required is not None and certificate_cn != required:
            return Refusal.CERTIFICATE_NOT_ALLOWED
        return None


def handlers(policy: AccessPolicy, metrics: NodeMetrics
             ) -> list[tuple[evt.NotificationEvent, object, list]]:
    return [(evt.EVT_REQUESTED, _handle_requested, [policy, metrics])]


def _handle_requested(event: Event, policy: AccessPolicy, metrics: NodeMetrics) -> None:
    """Refuse a peer the policy does not let in, and any peer when the check fails:
    pynetdicom logs and swallows an exception of a notification handler and goes on
    with the association, so one escaping from here would let the peer in."""
    assoc = event.assoc
    calling_ae, address = "", ""
    try:
        calling_ae = str(assoc.requestor.primitive.calling_ae_title).strip()
        address = str(assoc.requestor.address)
        reason = policy.refusal(calling_ae, address, _certificate_cn(assoc))
        error = None
    except Exception as exc:
        reason, error = Refusal.ACCESS_CHECK_FAILED, f"{type(exc).__name__}: {exc}"
    if reason is None:
        return
    metrics.association_rejected(str(reason))
    _log.warning("association.rejected", reason=str(reason), calling_ae=calling_ae,
                 address=address, **({} if error is None else {"error": error}))
    # pynetdicom skips negotiation once the request is rejected here; kill() then stops
    # the association's DUL thread as its own rejections do.
    assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
    assoc.kill()


def _certificate_cn(assoc: object) -> str | None:
    """The Common Name of the peer's client certificate (TLS with [tls].client_ca),
    or None."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    certificate = sock.getpeercert() or {}
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
