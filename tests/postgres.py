"""A throw-away PostgreSQL cluster for the tests: Debian's server binaries, a data folder
of its own, loopback TCP on a free port, no system service.

PostgreSQL refuses to run as root, and CI runs as root: the cluster then runs as the
`postgres` user that Debian's package creates (via runuser). A machine without the server
binaries skips the tests that need it, saying what to install.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peers import free_port

#: Where Debian installs the server binaries, one folder per major version.
SERVER_BINARIES = Path("/usr/lib/postgresql")
#: The role the tests connect as (a superuser, trusted on loopback).
ROLE = "fractured"


def server_bin() -> Path:
    """The newest installed server's bin folder, or a skip that says what is missing."""
    found = sorted(SERVER_BINARIES.glob("*/bin/initdb"),
                   key=lambda p: int(p.parents[1].name) if p.parents[1].name.isdigit() else 0)
    if not found:
        pytest.skip(f"PostgreSQL's server is not installed (no {SERVER_BINARIES}/*/bin/initdb;"
                    " apt-get install postgresql)")
    return found[-1].parent


def _run_as() -> list[str]:
    """The command prefix that runs the server as a user it accepts (not root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as "
                    "(apt-get install postgresql creates it)")
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser (util-linux) to start PostgreSQL as "
                    "the postgres user")
    return [runuser, "-u", "postgres", "--"]


@dataclass
class PostgresCluster:
    """One server for a test session; each test takes a fresh database of its own."""

    bin: Path
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="fractured-pg-")))
    port: int = field(default_factory=free_port)
    databases: int = 0

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def _server(self, tool: str, *args: str) -> None:
        subprocess.run([*_run_as(), str(self.bin / tool), *args], check=True,
                       capture_output=True, text=True, timeout=120)

    def start(self) -> PostgresCluster:
        if os.geteuid() == 0:
            _run_as()  # skips before anything is made for a user that does not exist
            shutil.chown(self.folder, "postgres")
        self._server("initdb", "-D", str(self.data), "-U", ROLE, "--auth=trust",
                     "--encoding=UTF8", "--no-sync")
        # Durability of the test server itself is not under test: fsync off keeps tests
        # quick on a busy machine. The socket lives in the cluster's own folder.
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} "
                   f"-c unix_socket_directories={self.folder} -c fsync=off "
                   "-c full_page_writes=off -c max_connections=200")
        self._server("pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"),
                     "-o", options, "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._server("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The URL an administrator would write (postgresql://, no driver named)."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        self.databases += 1
        name = f"test_{self.databases}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={ROLE} dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)
