"""Durable files: what has been acknowledged or published must survive a power cut.

Each file is written to a temporary name in its final folder, fsynced, renamed into
place and the folder fsynced, so a crash leaves either the whole file or nothing.
Files are 0600 and folders 0700 by default: the spool holds patient images. Shared by
the node (spool, results), bundles and TensorRT plans.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

#: write_durably's temporary names: .{final name}.{pid}-{thread id}.tmp
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>[0-9]+)-[0-9]+\.tmp$")


def ensure_dir(path: Path, mode: int = 0o700) -> Path:
    """Create `path` and its missing parents with `mode`."""
    if path.is_dir():  # the common case (a study's folder after its first image): one stat
        return path
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=mode, exist_ok=True)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk, so a rename publishes complete contents."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def temporary_writer(path: Path) -> int | None:
    """The pid of the process whose write_durably left `path`, or None when `path` is
    not one of its temporary files."""
    match = _TEMPORARY.match(path.name)
    return None if match is None else int(match["pid"])


def write_durably(path: Path, data: bytes | memoryview, mode: int = 0o600) -> None:
    """Write `data` to `path` atomically and durably (see module docstring)."""
    folder = ensure_dir(path.parent)
    tmp = folder / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
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
