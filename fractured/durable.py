"""Durable files: what has been acknowledged or published must survive a power cut.

Each file is written to a temporary name in its final folder, fsynced, renamed into
place and the folder fsynced, so a crash leaves either the whole file or nothing.
Files are 0600 and folders 0700 by default: the spool holds patient images. Shared by
the node (spool, results), bundles and TensorRT plans.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

#: This host, as write_durably's temporary names spell it (characters of a host name only).
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "_"
#: write_durably's temporary names: .{final name}.{pid}-{thread id}@{host}.tmp. The host
#: says whose pid it is when several hosts share a spool; names without one are from
#: versions that wrote on one host only.
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>[0-9]+)-[0-9]+(@(?P<host>[A-Za-z0-9._-]+))?\.tmp$")


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` and its missing parents with `mode`, durably: a new folder is an
    entry in its parent, which POSIX keeps across a power cut only once the parent is
    fsynced, and a file acknowledged in a lost folder is lost with it."""
    if path.is_dir():  # the common case (a study's folder after its first image): one stat
        return path
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=mode, exist_ok=True)
    for folder in reversed(missing):
        fsync_path(folder.parent)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk, so a rename publishes complete contents."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass(frozen=True)
class TemporaryWriter:
    """The process whose write_durably left a temporary file: its pid on `host` (None:
    a name from before hosts were named, written on this host)."""

    pid: int
    host: str | None

    @property
    def local(self) -> bool:
        """Whether the pid is one of this host's, so that its liveness can be asked."""
        return self.host is None or self.host == HOST


def temporary_writer(path: Path) -> TemporaryWriter | None:
    """Who left `path`, or None when `path` is not one of write_durably's temporary files."""
    match = _TEMPORARY.match(path.name)
    return None if match is None else TemporaryWriter(int(match["pid"]), match["host"])


def write_durably(path: Path, data: bytes | memoryview, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically and durably (see module docstring)."""
    folder = ensure_dir(path.parent)
    tmp = folder / f".{path.name}.{os.getpid()}-{threading.get_ident()}@{HOST}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(folder)
