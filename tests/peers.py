"""Real DICOM peers for the tests: DCMTK tools, Orthanc, dciodvfy, and the node itself.

Everything runs on loopback with free ports and is stopped by PID. A tool that is not
installed skips the test with the reason (CI installs them all: see .ci/run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.paths import REPO

# Debian's DCMTK keeps Nagle's algorithm on: ~40 ms lost per object without this.
PEER_ENV = {**os.environ, "TCP_NODELAY": "1"}


def need(tool: str) -> str:
    """The system's `tool`: the venv's bin is left out of the search, because pynetdicom
    installs its own storescu and echoscu there, with other options and output."""
    venv_bin = Path(sys.prefix) / "bin"
    search = os.pathsep.join(p for p in os.environ.get("PATH", os.defpath).split(os.pathsep)
                             if p and Path(p).resolve() != venv_bin.resolve())
    path = shutil.which(tool, path=search)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install dcmtk orthanc dicom3tools)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0,
             every: float = 0.2) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def echoscu(port: int, called: str = "FRACTURED", calling: str = "ECHOSCU",
            extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("echoscu"), "-aec", called, "-aet", calling, *extra,
                           "127.0.0.1", str(port)], capture_output=True, text=True,
                          env=PEER_ENV, timeout=60)


#: storescu's option to propose a file's own transfer syntax: by default it proposes
#: uncompressed ones only (and sends implicit or big endian files as explicit little
#: endian), and it cannot transcode to them from JPEG 2000, JPEG-LS or RLE.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.2": "-xb",  # else sent as explicit LE
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd",
}


def storescu(port: int, files: Sequence[Path], called: str = "FRACTURED",
             calling: str = "STORESCU", extra: Sequence[str] = ()
             ) -> subprocess.CompletedProcess[str]:
    """Send files as stored, one storescu run per transfer syntax; outputs concatenated.

    -d makes storescu print each response's status (see c_store_statuses).
    """
    groups: dict[str, list[Path]] = {}
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta
        syntax = str(meta.get("TransferSyntaxUID", ""))  # none in a bare dataset file
        groups.setdefault(STORESCU_PROPOSE.get(syntax, ""), []).append(path)
    runs = [subprocess.run([need("storescu"), "-d", *([option] if option else []), "-aec",
                            called, "-aet", calling, *extra, "127.0.0.1", str(port),
                            *map(str, group)],
                           capture_output=True, text=True, env=PEER_ENV, timeout=300)
            for option, group in groups.items()]
    return subprocess.CompletedProcess(
        [r.args for r in runs], max(r.returncode for r in runs),
        "".join(r.stdout for r in runs), "".join(r.stderr for r in runs))


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dicom3tools' dciodvfy reports for a file."""
    # errors="replace": dciodvfy echoes values in whatever bytes the file holds.
    proc = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True,
                          errors="replace", timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    return ([ln for ln in lines if ln.startswith("Error")],
            [ln for ln in lines if ln.startswith("Warning")])


@dataclass
class Storescp:
    """DCMTK storescp as a destination: every object it accepts lands in `folder`."""

    folder: Path
    ae_title: str = "DEST"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    #: DCMTK names of the only SOP classes accepted (e.g. "SecondaryCaptureImageStorage"),
    #: as a PACS configured to refuse some; None accepts every storage class.
    sop_classes: tuple[str, ...] | None = None
    #: storescp's transfer-syntax option: "+xa" every one, "+xi" Implicit VR LE only
    syntaxes: str = "+xa"
    #: storescp's TLS options (e.g. "+tls", key, certificate, "+cf", ca); () speaks TCP
    tls: tuple[str, ...] = ()
    #: more storescp options, e.g. ("--sleep-after", "2"): a PACS slow to answer
    options: tuple[str, ...] = ()

    def start(self) -> Storescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        # -uf: name files by SOP instance UID.
        negotiation = [self.syntaxes]
        if self.sop_classes is not None:
            profile = self.folder.parent / f"{self.folder.name}-storescp.cfg"
            contexts = "\n".join(
                f"PresentationContext{i} = {name}\\Uncompressed"
                for i, name in enumerate(("VerificationSOPClass", *self.sop_classes), 1))
            profile.write_text(
                "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LocalEndianExplicit\n"
                "TransferSyntax2 = LittleEndianImplicit\n[[PresentationContexts]]\n"
                f"[Only]\n{contexts}\n[[Profiles]]\n[Only]\nPresentationContexts = Only\n")
            negotiation = ["-xf", str(profile), "Only"]
        with self.log.open("wb") as log:  # -v: a line for each store request
            self.proc = subprocess.Popen(
                [need("storescp"), "-v", "-aet", self.ae_title, *negotiation, *self.tls,
                 *self.options, "-uf", "-od", str(self.folder), str(self.port)],
                env=PEER_ENV, stdout=log, stderr=subprocess.STDOUT)
        wait_for("storescp to listen", lambda: port_open(self.port), 10)
        return self

    @property
    def log(self) -> Path:
        return self.folder.parent / f"{self.folder.name}-storescp.log"

    def store_requests(self) -> int:
        """C-STORE requests received, a copy sent again included (files() holds one
        file per SOP instance)."""
        return self.log.read_text(errors="replace").count("Received Store Request")

    def files(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.is_file())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


#: Where Debian's Orthanc packages put their plugins.
ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


def plugin(name: str) -> str:
    """The path of Orthanc plugin `name` (lib<name>.so), or skip naming its package."""
    path = ORTHANC_PLUGINS / f"lib{name}.so"
    if not path.exists():
        package = {"OrthancDicomWeb": "orthanc-dicomweb",
                   "OrthancWebViewer": "orthanc-webviewer"}.get(name, name)
        pytest.skip(f"Orthanc plugin {name} is not installed (apt-get install {package})")
    return str(path)


@dataclass
class Orthanc:
    """Orthanc as the test PACS, with its own config in `folder` (see shared/examples)."""

    folder: Path
    modalities: dict[str, dict[str, Any]]
    lua: str | None = None
    #: Orthanc plugins to load by library name, e.g. "OrthancDicomWeb" (Debian's
    #: orthanc-dicomweb); a plugin that is not installed skips the test.
    plugins: tuple[str, ...] = ()
    ae_title: str = "ORTHANC"
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "Name": "test-pacs", "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"), "StorageCompression": False,
            "Plugins": [plugin(name) for name in self.plugins],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpServerEnabled": True, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port, "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True,
            "DicomModalities": self.modalities, "UserMetadata": {"FracturedSent": 1024},
            "StableAge": 1, "OverwriteInstances": False, "ExecuteLuaEnabled": False,
        }
        if self.lua:
            (self.folder / "route.lua").write_text(self.lua)
            cfg["LuaScripts"] = [str(self.folder / "route.lua")]
        (self.folder / "orthanc.json").write_text(json.dumps(cfg, indent=2))
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([need("Orthanc"), str(self.folder / "orthanc.json")],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.folder)
        wait_for("Orthanc to answer HTTP", self._alive, 30)
        return self

    def _alive(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=30) as rsp:
            body = rsp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def post(self, path: str, data: bytes) -> Any:
        req = urllib.request.Request(self.url(path), data=data, method="POST")
        with urllib.request.urlopen(req, timeout=60) as rsp:
            return json.loads(rsp.read())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.log.close()


@dataclass
class NodeProcess:
    """`fractured serve` as a real process, configured by a config.toml in `folder`."""

    folder: Path
    bundle: Path
    destinations: list[dict[str, Any]]
    quiet_period_s: float = 1.0
    port: int = field(default_factory=free_port)
    ae_title: str = "FRACTURED"
    proc: subprocess.Popen[bytes] | None = None
    delivery: dict[str, float] = field(default_factory=lambda: {
        "retry_interval_s": 1.0, "max_retry_interval_s": 2.0, "max_attempts": 3})
    engine: str = ""  # extra [engine] lines, e.g. 'boxes = "always"'
    results: str = ""  # extra [results] lines, e.g. "summary_image = true"
    sections: str = ""  # more tables, as TOML text: [access], [tls], ...
    #: [access] lines; "" where `sections` holds the node's own [access] table
    access: str = "allow_any = true"
    node: str = ""  # extra [node] lines, e.g. 'duplicates = "replace"'
    spool_dir: str = "spool"
    #: [database].url; several nodes given one PostgreSQL URL (and one absolute
    #: spool_dir) share a queue
    database_url: str = "sqlite:///fractured.db"
    worker: str = ""  # extra [worker] lines, e.g. "lease_s = 5.0"
    #: /metrics and /healthz: a free port of its own, not the default every node shares
    metrics_port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)  # added to the node's environment
    log_level: str = "info"

    @property
    def config(self) -> Path:
        return self.folder / "config.toml"

    def write_config(self) -> None:
        dests = "".join(
            f'\n[[destinations]]\nname = "{d["name"]}"\nae_title = "{d["ae_title"]}"\n'
            f'host = "127.0.0.1"\nport = {d["port"]}\n' for d in self.destinations)
        self.config.write_text(
            f'[node]\nae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f'spool_dir = "{self.spool_dir}"\n{self.node}\n\n'
            f'[database]\nurl = "{self.database_url}"\n\n'
            f"[study]\nquiet_period_s = {self.quiet_period_s}\n\n"
            f'[engine]\nbundle = "{self.bundle}"\n{self.engine}\n\n'
            f"[worker]\npoll_interval_s = 0.2\n{self.worker}\n\n"
            f"[results]\n{self.results}\n\n"
            "[delivery]\n" + "".join(f"{k} = {v}\n" for k, v in self.delivery.items())
            + "\n"
            f'[log]\nlevel = "{self.log_level}"\nformat = "json"\n\n'
            f"[metrics]\nport = {self.metrics_port}\n"
            + (f"\n[access]\n{self.access}\n" if self.access else "")
            + f'{dests}\n{self.sections}')

    def start(self) -> NodeProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.log = open(self.folder / "node.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fractured", "serve", "--config", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        wait_for("the node to listen", self._listening, 60)
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            pytest.fail(f"node exited with {self.proc.returncode}:\n{self.log_text()}")
        return port_open(self.port)

    def log_text(self) -> str:
        return (self.folder / "node.log").read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """The node's JSON log events called `name`."""
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    out.append(event)
        return out

    def wait_events(self, name: str, count: int = 1, timeout: float = 20.0
                    ) -> list[dict[str, Any]]:
        """The node's `name` events once there are at least `count` of them."""
        def enough() -> list[dict[str, Any]] | None:
            found = self.events(name)
            return found if len(found) >= count else None
        return wait_for(f"{count} {name} event(s)", enough, timeout)

    def store_and_settle(self, folder: Path, named: Sequence[tuple[str, Dataset]],
                         studies: int) -> dict[str, dict[str, Any]]:
        """Write each (name, dataset) to `folder`, store them all with storescu (every
        C-STORE must succeed) and wait for `studies` studies to be done or skipped: their
        `status` rows by Study Instance UID."""
        files = []
        for name, ds in named:
            ds.save_as(folder / f"{name}.dcm", enforce_file_format=True)
            files.append(folder / f"{name}.dcm")
        proc = storescu(self.port, files)
        assert c_store_statuses(proc.stdout + proc.stderr) == [0] * len(files)

        def settled() -> dict[str, dict[str, Any]] | None:
            rows = {s["study_instance_uid"]: s for s in self.status()["study_list"]}
            done = all(s["state"] in ("done", "skipped") for s in rows.values())
            return rows if len(rows) == studies and done else None

        return wait_for(f"{studies} studies to be settled", settled, 60)

    def status(self) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "fractured", "status", "--json", "--all",
                               "--config", str(self.config)], capture_output=True, text=True,
                              check=True, timeout=60)
        return json.loads(proc.stdout)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.log.close()
        return self.proc.returncode


def routing_pacs_and_node(root: Path, bundle: Path, quiet_period_s: float | None = None
                          ) -> tuple[Orthanc, NodeProcess]:
    """Orthanc as the PACS, routing what it is sent to a node running `bundle`
    (deploy/orthanc/autoroute.lua), which sends its results back to it; neither started."""
    node_port = free_port()
    orthanc = Orthanc(root / "orthanc",
                      modalities={"fractured": {"AET": "FRACTURED", "Host": "127.0.0.1",
                                                "Port": node_port}},
                      lua=(REPO / "deploy" / "orthanc" / "autoroute.lua").read_text())
    timing = {} if quiet_period_s is None else {"quiet_period_s": quiet_period_s}
    node = NodeProcess(root / "node", bundle, [{"name": "pacs", "ae_title": orthanc.ae_title,
                                                "port": orthanc.dicom_port}],
                       port=node_port, **timing)
    return orthanc, node


def in_process_node(folder: Path, bundle: Path) -> tuple[Any, int]:
    """A real Node in this process (anyone may connect, keep_first, no analysis for
    an hour, no metrics endpoint), started, spooling to `folder`/spool: for tests that
    look at its queue or inject a fault into it. Returns it and its port."""
    from fractured import config
    from fractured.daemon.service import Node

    port = free_port()
    (folder / "config.toml").write_text(
        f'[node]\nhost = "127.0.0.1"\nport = {port}\nspool_dir = "spool"\n'
        f'[database]\nurl = "sqlite:///q.db"\n[study]\nquiet_period_s = 3600\n'
        f'[engine]\nbundle = "{bundle}"\n[metrics]\nenabled = false\n'
        '[access]\nallow_any = true\n')
    node = Node(config.load(folder / "config.toml"))
    node.start()
    return node, port


def c_store_statuses(output: str) -> list[int]:
    """The C-STORE response statuses that `storescu -d` printed, in order."""
    return [int(s, 16) for s in re.findall(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", output)]


@dataclass(frozen=True)
class Certificates:
    """A test CA and the server and client key pairs it signed (PEM files)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certificates(folder: Path) -> Certificates:
    """A throw-away PKI made with the openssl command line (RSA 2048, as BCP 195 asks)."""
    openssl = need("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True,
                       timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
        "ca.crt", "-days", "2", "-subj", "/CN=fractured test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN=fractured test {name}")
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", "-extfile",
            f"{name}.ext")
    return Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key",
                        folder / "client.crt", folder / "client.key")


class Sender:
    """storescu in the background, its output in a file: -d prints a lot, and into an
    unread pipe it would block once the pipe is full, stalling the sending."""

    def __init__(self, port: int, files: list[Path], log: Path, calling: str = "MODALITY",
                 called: str = "FRACTURED") -> None:
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [need("storescu"), "-d", "-aec", called, "-aet", calling, "127.0.0.1",
                 str(port), *map(str, files)], stdout=out, stderr=subprocess.STDOUT,
                env=PEER_ENV)

    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        self.proc.wait(120)
        return self.log.read_text(errors="replace")
