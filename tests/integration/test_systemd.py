"""The node as a systemd Type=notify service, and the unit that runs it.

The tests play the service manager: they bind the AF_UNIX datagram socket that
$NOTIFY_SOCKET names and read what the node sends, as systemd would.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fractured import config
from fractured.daemon import limits, liveness, systemd
from fractured.daemon.decoding import address_space
from tests.paths import REPO
from tests.peers import NodeProcess, port_open, wait_for

UNIT = REPO / "deploy" / "fractured.service"


class Manager:
    """The service manager's end of the notify socket: every datagram, in order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def receive(self) -> None:
        """Read what has arrived so far."""
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait(self, key: str, count: int = 1, timeout: float = 60.0) -> list[dict[str, str]]:
        """The messages that hold `key`, once there are at least `count` of them."""
        def enough() -> list[dict[str, str]] | None:
            self.receive()
            found = [m for m in self.messages if key in m]
            return found if len(found) >= count else None
        return wait_for(f"{count} notify message(s) with {key}", enough, timeout, 0.05)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path):
    # The abstract namespace, as systemd itself hands out: no path-length limit to meet.
    manager = Manager(f"@fractured-test-{uuid.uuid4().hex}")
    yield manager
    manager.close()


@pytest.mark.slow
def test_node_notifies_ready_pings_the_watchdog_and_notifies_stopping(
        manager: Manager, tmp_path: Path, untrained_bundle: Path) -> None:
    node = NodeProcess(tmp_path / "node", untrained_bundle, [], env={
        "NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "2000000"})
    try:
        node.start()
        (ready,) = manager.wait("READY")
        assert ready["READY"] == "1"
        assert str(node.port) in ready["STATUS"], "the status line says where it listens"
        assert port_open(node.port), "READY=1 only once the listener is open"
        pings = manager.wait("WATCHDOG", count=2)
        assert all(p == {"WATCHDOG": "1"} for p in pings)
        assert manager.messages.index(ready) < manager.messages.index(pings[0])
    finally:
        code = node.stop(signal.SIGTERM)
    assert code == 0, node.log_text()
    (stopping,) = manager.wait("STOPPING")
    assert stopping["STOPPING"] == "1"
    (extend,) = manager.wait("EXTEND_TIMEOUT_USEC")
    assert int(extend["EXTEND_TIMEOUT_USEC"]) > 0
    assert [e["status"] for e in node.events("systemd.ready")] == [ready["STATUS"]]
    assert node.events("systemd.stopping")


def test_notifier_sends_to_a_socket_path(tmp_path: Path) -> None:
    manager = Manager(str(tmp_path / "notify"))
    try:
        notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": manager.address})
        notifier.ready("serving\non two lines")
        notifier.extend_timeout(1.5, "stopping")
        manager.wait("EXTEND_TIMEOUT_USEC")
    finally:
        manager.close()
    assert manager.messages == [
        {"READY": "1", "STATUS": "serving on two lines"},
        {"EXTEND_TIMEOUT_USEC": "1500000", "STATUS": "stopping"}]


def test_notifier_without_a_manager_does_nothing() -> None:
    assert not systemd.Notifier.from_environ({}).send("READY=1")
    unsupported = systemd.Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not unsupported.enabled


def test_notifier_survives_a_manager_that_went_away(tmp_path: Path) -> None:
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert not notifier.watchdog()


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_watchdog_timeout_from_the_environment(environ: dict[str, str],
                                               expected: float | None) -> None:
    assert systemd.watchdog_timeout(environ) == expected


def test_watchdog_pings_only_while_nothing_is_wedged(manager: Manager) -> None:
    wedged: list[str] = []
    watchdog = systemd.Watchdog(systemd.Notifier.from_environ(
        {"NOTIFY_SOCKET": manager.address}), 0.1, lambda: list(wedged))
    watchdog.start()
    try:
        manager.wait("WATCHDOG", count=2, timeout=30)
        wedged.append(liveness.SCHEDULER)
        time.sleep(0.2)  # a ping already decided may still be on its way
        manager.receive()
        before = len(manager.messages)
        time.sleep(0.5)  # five intervals with something wedged
        manager.receive()
        assert len(manager.messages) == before, "no ping while a loop is wedged"
        wedged.clear()
        manager.wait("WATCHDOG", count=before + 1, timeout=30)
    finally:
        watchdog.stop()


def test_heartbeats_name_the_loops_that_stopped() -> None:
    beats = liveness.Heartbeats(["a", "b"])
    assert beats.stale(60) == []
    time.sleep(0.2)
    beats.beat("b")
    assert beats.stale(0.1) == ["a"]
    beats.reset()
    assert beats.stale(60) == []


# --- the unit file -------------------------------------------------------------------

def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return path


def unit_settings(text: str) -> dict[str, list[str]]:
    """Each key of a unit file with its values, in order (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def verify(unit_text: str, folder: Path, exec_start: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` on a copy of the unit whose ExecStart runs `exec_start`
    (verify insists that the binary exists, and the installed one is not here)."""
    settings = unit_settings(unit_text)
    (command,) = settings["ExecStart"]
    binary = command.split()[0]
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "fractured.service"
    copy.write_text(unit_text.replace(f"ExecStart={binary} ", f"ExecStart={exec_start} "))
    return subprocess.run([systemd_analyze(), "verify", "--man=no", str(copy)],
                          capture_output=True, text=True, timeout=120)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    proc = verify(UNIT.read_text(), tmp_path, sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_gpu_drop_in_lets_in_only_the_nvidia_devices(tmp_path: Path) -> None:
    """deploy/gpu.conf, which install.sh adds on a GPU node, is valid with the unit and
    replaces the hidden /dev by a closed device list naming the NVIDIA devices."""
    drop_in = (REPO / "deploy" / "gpu.conf").read_text()
    settings = unit_settings(drop_in)
    assert settings["PrivateDevices"] == ["no"] and settings["DevicePolicy"] == ["closed"]
    assert settings["DeviceAllow"] == ["char-nvidia-frontend rw", "char-nvidia-uvm rw"]
    combined = UNIT.read_text() + "\n" + drop_in  # as systemd merges it: a later [Service]
    proc = verify(combined, tmp_path, sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr
    assert "gpu.conf" in INSTALL.read_text() and "/dev/nvidiactl" in INSTALL.read_text()


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above can fail: a misspelt setting makes verify complain."""
    broken = UNIT.read_text().replace("Type=notify", "Type=notfiy")
    assert broken != UNIT.read_text()
    proc = verify(broken, tmp_path, sys.executable)
    assert "notfiy" in proc.stderr


def test_unit_runs_the_installed_node_as_a_notify_service() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["NotifyAccess"] == ["main"]
    assert settings["ExecStart"] == [
        "/opt/fractured/venv/bin/fractured serve --config /etc/fractured/config.toml"]
    assert settings["User"] == settings["Group"] == ["fractured"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["CapabilityBoundingSet"] == [""]
    assert settings["ReadWritePaths"] == ["/var/lib/fractured"]
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert settings[key] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ProtectHome"] == ["yes"]


def test_unit_limits_hold_the_decoder_and_every_connection() -> None:
    """MemoryMax leaves the decoder its whole address space and the node a gigabyte;
    TasksMax two threads for each connection the node may hold, and room; an OOM kill
    of the decoder does not stop the service."""
    settings = unit_settings(UNIT.read_text())
    defaults = config.from_dict({}, base=REPO)
    gib = 1 << 30
    memory_max = int(settings["MemoryMax"][0].removesuffix("G")) * gib
    assert memory_max >= address_space(defaults.engine.max_image_megapixels) + gib
    assert int(settings["MemoryHigh"][0].removesuffix("G")) * gib < memory_max
    connections = limits.CONNECTIONS_PER_ASSOCIATION * defaults.node.max_associations
    assert int(settings["TasksMax"][0]) >= 2 * connections + 128
    assert settings["OOMPolicy"] == ["continue"]


def test_unit_gives_a_stop_more_time_than_the_shutdown_grace() -> None:

    grace = config.load(REPO / "config.toml").node.shutdown_grace_s
    (stop,) = unit_settings(UNIT.read_text())["TimeoutStopSec"]
    (watchdog,) = unit_settings(UNIT.read_text())["WatchdogSec"]
    assert float(stop) > grace + 30, "the running study needs time after the grace too"
    assert float(watchdog) >= liveness.STALE_AFTER_MIN_S


# --- the installer ---------------------------------------------------------------------

INSTALL = REPO / "deploy" / "install.sh"


def default_bundle() -> str:
    """The bundle install.sh activates on a first install (its DEFAULT_BUNDLE; which
    one it must be is tests/artifacts/test_shipped_model's to say)."""
    (line,) = [line for line in INSTALL.read_text().splitlines()
               if line.startswith("DEFAULT_BUNDLE=")]
    return line.partition("=")[2]


def install(root: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(root)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_install_refuses_an_unknown_option() -> None:
    proc = subprocess.run(["bash", str(INSTALL), "--rooot", "/tmp/x"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown option: --rooot" in proc.stderr


@pytest.mark.slow
def test_install_stages_the_service_keeps_the_admins_config_and_checks_it(tmp_path: Path) -> None:

    root = tmp_path / "root"
    install(root)
    state, etc = root / "var/lib/fractured", root / "etc/fractured"
    assert mode(state) == mode(state / "spool") == 0o700
    assert mode(etc) == 0o750
    assert mode(etc / "config.toml") == 0o640
    unit = root / "etc/systemd/system/fractured.service"
    assert unit.read_text() == UNIT.read_text()
    assert not (root / "etc/systemd/system/fractured.service.d").exists(), \
        "port 11112 and a 30 s grace need no drop-in"

    # The documented defaults, with the var/ paths in /var/lib/fractured.
    written, shipped = config.load(etc / "config.toml"), config.load(REPO / "config.toml")
    assert written.node.spool_dir == Path("/var/lib/fractured/spool")
    assert written.database.url == "sqlite:////var/lib/fractured/fractured.db"
    assert written.engine.bundle == Path("/opt/fractured/engines")
    assert dataclasses.replace(written.node, spool_dir=shipped.node.spool_dir) == shipped.node
    assert written.study == shipped.study and written.destinations == shipped.destinations

    # The venv serves without torch and runs the shipped model, active and verified.
    venv = root / "opt/fractured/venv/bin"
    engines = root / "opt/fractured/engines"
    assert (engines / "ACTIVE").read_text().strip() == default_bundle()
    listing = subprocess.run([str(venv / "fractured"), "engines", "list", "--engines",
                              str(engines)], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert default_bundle() in listing.stdout
    torch = subprocess.run([str(venv / "python"), "-c",
                            "import importlib.util; print(importlib.util.find_spec('torch'))"],
                           capture_output=True, text=True, timeout=120)
    assert torch.stdout.strip() == "None", "serving must not need torch"
    proc = verify(unit.read_text(), tmp_path / "verify", str(venv / "fractured"))
    assert proc.returncode == 0, proc.stderr

    # An administrator's changes survive a second run; the drop-in follows the config.
    text = (etc / "config.toml").read_text()
    edited = (text.replace("port = 11112", "port = 104", 1)
              .replace("shutdown_grace_s = 30.0", "shutdown_grace_s = 200.0", 1)
              + "\n# local change\n")
    (etc / "config.toml").write_text(edited)
    rerun = install(root)
    assert "kept /etc/fractured/config.toml" in rerun.stdout
    assert (etc / "config.toml").read_text() == edited
    assert mode(etc / "config.toml") == 0o640
    dropin = root / "etc/systemd/system/fractured.service.d/from-config.conf"
    settings = unit_settings(dropin.read_text())
    assert settings["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert settings["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert float(settings["TimeoutStopSec"][0]) > 200
    proc = verify(unit.read_text() + dropin.read_text(), tmp_path / "verify-dropin",
                  str(venv / "fractured"))
    assert proc.returncode == 0, proc.stderr

    (etc / "config.toml").write_text(text)
    install(root)
    assert not dropin.exists(), "the drop-in goes when the config no longer needs it"

    # A config the node would refuse stops the install, naming the key.
    (etc / "config.toml").write_text(text + "\n[nodes]\nport = 1\n")
    proc = subprocess.run(["bash", str(INSTALL), "--root", str(root)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode != 0
    assert "nodes: unknown section or key" in proc.stderr
