"""config.toml -> typed, validated settings.

Every mistake an administrator can make in the file is reported with the key it concerns
(`[node].port: expected an integer, got "11112x"`), because a node that starts with a
silently ignored typo is worse than one that refuses to start.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from fractured import database_url
from fractured.dicom_uids import is_uid

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.toml"


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class NodeSettings:
    """The DICOM listener and where received instances are spooled."""

    ae_title: str = "FRACTURED"
    host: str = "0.0.0.0"
    port: int = 11112
    spool_dir: Path = Path("var/spool")
    network_timeout_s: float = 60.0
    shutdown_grace_s: float = 30.0
    #: Associations served at once; one more is rejected transiently (the peer retries).
    max_associations: int = 32
    #: Connections taken at once from one IP address; more are closed as they come
    #: (daemon.limits): a peer trickling bytes cannot hold every slot.
    max_connections_per_peer: int = 24
    #: The largest data set kept, in MiB: a larger one is answered with a failure
    #: status, one past twice this aborts its association (daemon.limits).
    max_object_mb: int = 128
    #: An instance already held (same SOP Instance UID) sent again: "keep_first"
    #: acknowledges it and keeps the copy held; "replace" stores the new copy and
    #: analyses its study again.
    duplicates: Literal["keep_first", "replace"] = "keep_first"
    #: Storage SOP Class UIDs accepted besides CR, DX and Secondary Capture.
    extra_sop_classes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Peer:
    """A calling AE title allowed to associate, and the addresses it may come from."""

    ae_title: str
    #: IP addresses or networks ("10.1.2.3", "10.1.0.0/16", "fd00::/8").
    addresses: list[str]
    #: With [tls].client_ca: the Common Name the peer's client certificate must carry;
    #: "" accepts any certificate the CA signed, whatever AE title its holder claims.
    certificate_cn: str = ""


@dataclass(frozen=True)
class AccessSettings:
    """Who may associate: the peers listed, or, only where `allow_any` says so, anyone.

    A node with no peers listed refuses to start (daemon.service): anyone who could
    reach its port could otherwise have results stored under any patient in the PACS.
    """

    #: Let any calling AE from any address associate when no peers are listed (a
    #: warning at every start); for a test bench, never a hospital network.
    allow_any: bool = False
    require_called_ae_title: bool = False
    peers: list[Peer] = field(default_factory=list)


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS on the listener (PS3.15 Annex B); with it on, the port speaks TLS only."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    #: CA certificates (PEM); when set, a client must present a certificate they signed.
    client_ca: Path | None = None


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///var/fractured.db"


@dataclass(frozen=True)
class StudySettings:
    """When a study counts as complete, and which images in it are analysed."""

    quiet_period_s: float = 10.0
    modalities: list[str] = field(default_factory=lambda: ["CR", "DX"])


@dataclass(frozen=True)
class RoutingRule:
    """Which images a rule covers (every listed criterion must hold; an empty list holds
    for any value) and whether they are analysed. Body part and view compare without
    regard to case, as vendors write them either way."""

    name: str
    action: Literal["analyse", "skip"]
    modality: list[str] = field(default_factory=list)
    sop_class: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    view: list[str] = field(default_factory=list)
    calling_ae: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RoutingSettings:
    """Rules tried in order for each image; the first that covers it decides. With no
    rules, the images whose Modality is in [study].modalities are analysed."""

    rules: list[RoutingRule] = field(default_factory=list)


@dataclass(frozen=True)
class EngineSettings:
    bundle: Path = Path("engines")  # an engines folder (ACTIVE) or one bundle
    backend: Literal["auto", "onnxruntime", "torch", "tensorrt"] = "auto"
    tta: bool = False
    max_batch: int = 8
    threads: int = 0
    #: Which images show the detector's boxes (engine.pipeline.BOX_GATES): only those the
    #: classifier calls a likely fracture (default), at least a possible one, or every image.
    boxes: Literal["possible", "likely", "always"] = "likely"
    #: Body Part Examined terms analysed beyond the bundle's intended use
    #: (engine.intended_use): outside what the model was validated on, so only by an
    #: operator's explicit choice, logged at every start. Empty: the bundle's own.
    extra_body_parts: list[str] = field(default_factory=list)
    #: Images decoded at most this big (rows x columns x frames x samples, millions;
    #: engine.preprocess.MAX_MEGAPIXELS): a larger one is refused before decoding.
    max_image_megapixels: float = 40.0


@dataclass(frozen=True)
class WorkerSettings:
    """How studies are claimed; a lease outlives a crashed node by at most lease_s."""

    poll_interval_s: float = 1.0
    lease_s: float = 300.0
    #: A study claimed this many times without its run ending (its worker died: out of
    #: memory, a decoder crash) is FAILED instead of claimed again.
    max_claims: int = 3


@dataclass(frozen=True)
class ResultsSettings:
    overlay_max_size: int = 1024
    colormap: Literal["jet", "turbo", "inferno", "magma", "viridis", "hot"] = "jet"
    summary_image: bool = False


@dataclass(frozen=True)
class DeliverySettings:
    """Retries with exponential backoff: the n-th retry waits retry_interval_s * 2^(n-1),
    at most max_retry_interval_s, each +-jitter (a share), so a PACS back from an outage
    is not hit by every waiting node at once. After max_attempts a delivery is a dead
    letter, kept until `fractured retry`."""

    retry_interval_s: float = 30.0
    max_retry_interval_s: float = 3600.0
    jitter: float = 0.2
    max_attempts: int = 12


@dataclass(frozen=True)
class Destination:
    """A DICOM peer (usually the PACS) that receives every result object."""

    name: str
    ae_title: str
    host: str
    port: int
    #: DICOM TLS to this peer (PS3.15 Annex B, the BCP 195 profile): TLS 1.2 or later,
    #: its certificate verified against `ca_file` and its name against `server_name`.
    tls: bool = False
    #: CA certificates (PEM) that signed the peer's certificate; None: the system's.
    ca_file: Path | None = None
    #: The node's own certificate and key (PEM), for a peer that requires a client one.
    certificate: Path | None = None
    private_key: Path | None = None
    #: The name the peer's certificate must carry; "" means `host`.
    server_name: str = ""


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class RetentionSettings:
    """How long the node keeps what it holds of a finished study (daemon.retention): the
    node is not an archive, the PACS keeps the images and the results. Ages are days
    since the study settled; 0 keeps that kind forever. A study's rows go only with its
    files (a spool image without a row would be recorded again at start-up), so
    records_days is 0 or at least the other two, and they are not 0 then."""

    #: Received images (and their instance rows) of finished studies.
    images_days: float = 7.0
    #: Result objects every destination took; undelivered ones stay with the records.
    results_days: float = 7.0
    #: Database rows of finished studies: UIDs, states, deliveries, shadow findings.
    records_days: float = 90.0
    #: Seconds between two runs of the retention job.
    interval_s: float = 3600.0


@dataclass(frozen=True)
class MetricsSettings:
    """The monitoring endpoint: Prometheus metrics at /metrics, a health check at /healthz.
    On loopback by default: the figures carry no patient data, but say what the node
    handles and when, which is nobody else's business on a hospital network."""

    enabled: bool = True
    host: str = "127.0.0.1"
    #: In the range Prometheus exporters use (9100-9999); move it where another exporter
    #: on the host has it.
    port: int = 9112


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    access: AccessSettings = field(default_factory=AccessSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    study: StudySettings = field(default_factory=StudySettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    results: ResultsSettings = field(default_factory=ResultsSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    destinations: list[Destination] = field(default_factory=list)
    log: LogSettings = field(default_factory=LogSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    source: Path | None = None


def load(path: str | Path) -> Settings:
    """Read and validate a config file; relative paths resolve against its folder."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return from_dict(raw, base=path.parent, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def from_dict(raw: dict[str, Any], *, base: Path, source: Path | None = None) -> Settings:
    """Build Settings from parsed TOML; `base` anchors relative paths."""
    sections: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "source" or (f.name == "destinations" and f.name not in raw):
            continue
        value = raw.get(f.name, {})
        if f.name == "destinations":
            if not isinstance(value, list):
                raise ConfigError("[[destinations]]: expected an array of tables")
            sections[f.name] = [
                build_section(Destination, item, f"[[destinations]][{i}]", base)
                for i, item in enumerate(value)
            ]
        else:
            sections[f.name] = build_section(_section_type(f), value, f"[{f.name}]", base)
    known = {f.name for f in fields(Settings)} - {"source"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section or key "
                          f"(known: {', '.join(sorted(known))})")
    sections["database"] = DatabaseSettings(url=_anchor_sqlite(sections["database"].url, base))
    settings = Settings(**sections, source=source)
    _check(settings)
    return settings


def _anchor_sqlite(url: str, base: Path) -> str:
    """Resolve a relative SQLite file path (sqlite:///var/x.db) against the config folder."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
        return prefix + str((base / url[len(prefix):]).resolve())
    return url


def _section_type(f: Any) -> type:
    return typing.get_type_hints(Settings)[f.name]


def build_section(cls: type, raw: Any, where: str, base: Path) -> Any:
    """A settings dataclass from its TOML table: unknown keys and wrong types are
    ConfigErrors naming `where.key`; missing keys take the dataclass default. Shared
    with the training config so both files follow one set of rules."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
    values = {}
    for f in fields(cls):
        if f.name in raw:
            values[f.name] = _coerce(raw[f.name], hints[f.name], f"{where}.{f.name}", base)
        elif hints[f.name] is Path:
            values[f.name] = (base / f.default).resolve()
        elif hints[f.name] == Path | None:
            values[f.name] = None
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{where}.{f.name}: required key is missing")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str, base: Path) -> Any:
    origin = typing.get_origin(hint)
    if hint == Path | None:  # an optional path: absent means None, present is a path
        hint = Path
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, where, base)
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path (string), got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path).resolve()
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, choices))}, "
                              f"got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]", base) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported settings type at {where}")
    # bool is an int in Python: refuse it where a number is wanted.
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and type(value) is hint:
        return value
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    raise ConfigError(f"{where}: expected {names[hint]}, got {value!r}")


def _check(s: Settings) -> None:
    """Rules across or within keys that types alone cannot express."""
    for where, title in [("[node].ae_title", s.node.ae_title)] + [
        (f"[[destinations]][{i}].ae_title", d.ae_title) for i, d in enumerate(s.destinations)
    ] + [(f"[[access.peers]][{i}].ae_title", p.ae_title) for i, p in enumerate(s.access.peers)]:
        if not 0 < len(title.strip()) <= 16 or "\\" in title:
            raise ConfigError(f"{where}: an AE title is 1-16 characters without '\\', "
                              f"got {title!r}")
    ports = [("[node].port", s.node.port), ("[metrics].port", s.metrics.port)] + [
        (f"[[destinations]][{i}].port", d.port) for i, d in enumerate(s.destinations)
    ]
    for where, port in ports:
        if not 0 < port < 65536:
            raise ConfigError(f"{where}: a TCP port is 1-65535, got {port}")
    positive = {
        "[study].quiet_period_s": s.study.quiet_period_s,
        "[engine].max_batch": s.engine.max_batch,
        "[worker].poll_interval_s": s.worker.poll_interval_s,
        "[worker].lease_s": s.worker.lease_s,
        "[worker].max_claims": s.worker.max_claims,
        "[engine].max_image_megapixels": s.engine.max_image_megapixels,
        "[results].overlay_max_size": s.results.overlay_max_size,
        "[delivery].max_attempts": s.delivery.max_attempts,
        "[delivery].retry_interval_s": s.delivery.retry_interval_s,
        "[delivery].max_retry_interval_s": s.delivery.max_retry_interval_s,
        "[node].network_timeout_s": s.node.network_timeout_s,
        "[node].shutdown_grace_s": s.node.shutdown_grace_s,
        "[node].max_associations": s.node.max_associations,
        "[node].max_connections_per_peer": s.node.max_connections_per_peer,
        "[node].max_object_mb": s.node.max_object_mb,
    }
    for where, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: must be greater than 0, got {value}")
    if not 0.0 <= s.delivery.jitter < 1.0:
        raise ConfigError(f"[delivery].jitter: a share in [0, 1), got {s.delivery.jitter}")
    if s.engine.threads < 0:
        raise ConfigError(f"[engine].threads: 0 (automatic) or more, got {s.engine.threads}")
    names = [d.name for d in s.destinations]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"[[destinations]].name: {name!r} is used twice")
    for i, term in enumerate(s.engine.extra_body_parts):
        if not re.fullmatch(r"[A-Za-z0-9_ ]{1,16}", term) or not term.strip():
            raise ConfigError(f"[engine].extra_body_parts[{i}]: a Body Part Examined term "
                              f"(letters, digits, _ and spaces; 16 at most), got {term!r}")
    for i, uid in enumerate(s.node.extra_sop_classes):
        if not is_uid(uid):
            raise ConfigError(f"[node].extra_sop_classes[{i}]: not a UID, got {uid!r}")
    names = [r.name for r in s.routing.rules]
    for i, rule in enumerate(s.routing.rules):
        if not rule.name.strip() or rule.name in names[:i]:
            raise ConfigError(f"[[routing.rules]][{i}].name: a rule needs a name of its own, "
                              f"got {rule.name!r}")
    for i, destination in enumerate(s.destinations):
        _check_destination_tls(destination, f"[[destinations]][{i}]")
    _check_access(s.access, s.tls)
    _check_tls(s.tls)
    _check_retention(s.retention)
    try:
        database_url.normalise(s.database.url)
    except database_url.DatabaseUrlError as exc:
        raise ConfigError(f"[database].url: {exc}") from None


def _check_access(access: AccessSettings, tls: TlsSettings) -> None:
    for i, peer in enumerate(access.peers):
        if peer.certificate_cn and tls.client_ca is None:
            raise ConfigError(f"[[access.peers]][{i}].certificate_cn: needs client "
                              "certificates: set [tls].client_ca")
    if access.allow_any and access.peers:
        raise ConfigError("[access].allow_any: true, yet [[access.peers]] are listed: "
                          "set allow_any = false to let only them in, or remove them")
    seen: set[str] = set()
    for i, peer in enumerate(access.peers):
        where = f"[[access.peers]][{i}]"
        if peer.ae_title.strip() in seen:
            raise ConfigError(f"{where}.ae_title: {peer.ae_title!r} is listed twice "
                              "(give one entry all its addresses)")
        seen.add(peer.ae_title.strip())
        if not peer.addresses:
            raise ConfigError(f"{where}.addresses: list at least one address or network "
                              '("0.0.0.0/0" for any IPv4 address)')
        for j, address in enumerate(peer.addresses):
            try:
                ipaddress.ip_network(address, strict=False)
            except ValueError:
                raise ConfigError(f"{where}.addresses[{j}]: not an IP address or network, "
                                  f"got {address!r}") from None


def _check_retention(retention: RetentionSettings) -> None:
    ages = {"images_days": retention.images_days, "results_days": retention.results_days,
            "records_days": retention.records_days}
    for key, days in ages.items():
        if days < 0:
            raise ConfigError(f"[retention].{key}: days, or 0 to keep forever, got {days:g}")
    if retention.interval_s <= 0:
        raise ConfigError(f"[retention].interval_s: must be greater than 0, "
                          f"got {retention.interval_s:g}")
    records = retention.records_days
    for key in ("images_days", "results_days"):
        if records and not 0 < ages[key] <= records:
            raise ConfigError(
                f"[retention].records_days: a study's rows go only with its files, so "
                f"records_days is 0 (keep) or at least {key}, which is then not 0; got "
                f"records_days {records:g}, {key} {ages[key]:g}")


def _check_destination_tls(destination: Destination, where: str) -> None:
    keys = ("ca_file", "certificate", "private_key")
    if not destination.tls:
        given = [key for key in (*keys, "server_name") if getattr(destination, key)]
        if given:
            # Settings for TLS without TLS on would send the results in the clear while
            # the administrator believes otherwise.
            raise ConfigError(f"{where}.{given[0]}: only used with TLS; set {where}.tls = "
                              "true (or remove the key)")
        return
    if (destination.certificate is None) != (destination.private_key is None):
        missing = "private_key" if destination.private_key is None else "certificate"
        raise ConfigError(f"{where}.{missing}: a client certificate needs both "
                          "certificate and private_key")
    for key in keys:
        path = getattr(destination, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"{where}.{key}: file not found: {path}")


def _check_tls(tls: TlsSettings) -> None:
    if not tls.enabled:
        return
    for key in ("certificate", "private_key"):
        if getattr(tls, key) is None:
            raise ConfigError(f"[tls].{key}: required when [tls].enabled is true")
    for key in ("certificate", "private_key", "client_ca"):
        path = getattr(tls, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"[tls].{key}: file not found: {path}")
