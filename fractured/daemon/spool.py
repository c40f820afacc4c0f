"""Durable files: what has been acknowledged to a peer must survive a power cut.

Each file is written to a temporary name in its final folder, fsynced, renamed into
place and the folder fsynced, so a crash leaves either the whole file or nothing.
Files are 0600 and folders 0700: the spool holds patient images.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(value: str) -> bool:
    """A syntactically valid DICOM UID (also what makes it safe as a file name)."""
    return len(value) <= 64 and bool(_UID.match(value))


def ensure_dir(path: Path) -> Path:
    """Create `path` and its missing parents with mode 0700."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
    return path


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically and durably (see module docstring)."""
    folder = ensure_dir(path.parent)
    tmp = folder / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
