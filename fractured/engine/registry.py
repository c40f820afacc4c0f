"""An engines folder: bundles side by side, one active, rolled out and back by a pointer.

```
engines/
  ACTIVE        the active bundle's folder name, one line, replaced atomically
  HISTORY       one line per change: time, action (activate / rollback), folder name
  SHADOW        optional: a candidate bundle run beside the active one, results kept
                in the database and never sent (`fractured engines compare`)
  default/  fractured-1.0.0/  fractured-1.1.0/  ...   immutable bundles
```

`[engine].bundle` names either one bundle (a folder with manifest.json) or such an
engines folder. The running node reads ACTIVE before each study and switches between
studies when it changed (daemon.active_model), so a roll-out or a rollback needs no
restart and never splits a study between two models. A bundle is verified in full
(schema and checksums) before it is made active, so ACTIVE never names a broken one.

Rollback is a stack replayed from HISTORY: each activation pushes, each rollback pops,
so rolling back twice after activating b then c returns to whatever was active before b.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fractured.durable import write_durably
from fractured.engine.bundle import MANIFEST_FILE, Bundle, BundleError, Manifest

ACTIVE_FILE = "ACTIVE"
SHADOW_FILE = "SHADOW"
HISTORY_FILE = "HISTORY"
ACTIVATE = "activate"
ROLLBACK = "rollback"


class RegistryError(Exception):
    """An engines folder that cannot do what was asked; the message says why."""


def is_bundle(path: Path) -> bool:
    """Whether `path` is a single bundle (rather than an engines folder)."""
    return (Path(path) / MANIFEST_FILE).is_file()


@dataclass(frozen=True)
class Entry:
    """One bundle folder of an engines folder, as `fractured engines list` shows it."""

    name: str  # the folder name, what `activate` takes
    manifest: Manifest | None  # None when the bundle does not verify
    error: str | None
    active: bool
    shadow: bool


class Registry:
    """The engines folder at `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise RegistryError(f"{self.root}: no such engines folder")

    def active(self) -> str | None:
        """The active bundle's folder name, or None before the first activation."""
        return self.pointer(ACTIVE_FILE)

    def shadow(self) -> str | None:
        """The shadow bundle's folder name, or None when no candidate is shadowed."""
        return self.pointer(SHADOW_FILE)

    def pointer(self, file_name: str) -> str | None:
        """The folder name in pointer file ACTIVE or SHADOW (None: absent or empty)."""
        path = self.root / file_name
        if not path.is_file():
            return None
        name = path.read_text(encoding="utf-8").strip()
        return name or None

    def bundle(self, name: str) -> Bundle:
        """Bundle `name`, verified."""
        return Bundle.load(self._folder(name))

    def set_shadow(self, name: str | None) -> Bundle | None:
        """Shadow bundle `name` beside the active one (verified first); None stops."""
        if name is None:
            (self.root / SHADOW_FILE).unlink(missing_ok=True)
            return None
        bundle = self.bundle(name)
        write_durably(self.root / SHADOW_FILE, f"{name}\n".encode(), mode=0o644)
        return bundle

    def active_bundle(self) -> Bundle:
        """The active bundle, verified; RegistryError/BundleError say what is wrong."""
        name = self.active()
        if name is None:
            raise RegistryError(f"{self.root}: no active bundle ({ACTIVE_FILE} is missing); "
                                f"run `fractured engines activate NAME --engines {self.root}`")
        return Bundle.load(self._folder(name))

    def entries(self) -> list[Entry]:
        """Every bundle folder, verified, sorted by name."""
        active, shadow = self.active(), self.shadow()
        found = []
        for folder in sorted(p for p in self.root.iterdir()
                             if p.is_dir() and not p.name.startswith(".") and is_bundle(p)):
            try:
                manifest, error = Bundle.load(folder).manifest, None
            except BundleError as exc:
                manifest, error = None, str(exc)
            found.append(Entry(folder.name, manifest, error, folder.name == active,
                               folder.name == shadow))
        return found

    def activate(self, name: str) -> Bundle:
        """Verify bundle `name` and make it active (recorded for rollback)."""
        bundle = Bundle.load(self._folder(name))
        self._point_to(name, ACTIVATE)
        return bundle

    def rollback(self) -> Bundle:
        """Make the previously active bundle active again."""
        stack = self.stack()
        if len(stack) < 2:
            raise RegistryError(f"{self.root}: nothing to roll back to (the history holds "
                                f"{len(stack)} activation{'s' if len(stack) != 1 else ''})")
        previous = stack[-2]
        bundle = Bundle.load(self._folder(previous))
        self._point_to(previous, ROLLBACK)
        return bundle

    def stack(self) -> list[str]:
        """The activations still in force, oldest first (HISTORY replayed)."""
        stack: list[str] = []
        path = self.root / HISTORY_FILE
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        for number, line in enumerate(lines, start=1):
            fields = line.split("\t")
            if len(fields) != 3 or fields[1] not in (ACTIVATE, ROLLBACK):
                raise RegistryError(f"{path}:{number}: not a history line (time, action, name)")
            if fields[1] == ACTIVATE:
                stack.append(fields[2])
            elif stack:
                stack.pop()
        return stack

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        if Path(name).name != name or name.startswith(".") or not folder.is_dir():
            known = ", ".join(entry.name for entry in self.entries()) or "none"
            raise RegistryError(f"{self.root}: no bundle {name!r} (bundles: {known})")
        return folder

    def _point_to(self, name: str, action: str) -> None:
        # ACTIVE is replaced atomically (write, fsync, rename), so a node reading it
        # sees the old name or the new one, never half of either.
        write_durably(self.root / ACTIVE_FILE, f"{name}\n".encode(), mode=0o644)
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with open(self.root / HISTORY_FILE, "a", encoding="utf-8") as history:
            history.write(f"{stamp}\t{action}\t{name}\n")


def resolve_bundle(path: Path) -> Bundle:
    """The bundle `[engine].bundle` names: the folder itself, or an engines folder's
    active bundle."""
    path = Path(path)
    if is_bundle(path):
        return Bundle.load(path)
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle or engines folder")
    try:
        return Registry(path).active_bundle()
    except RegistryError as exc:
        raise BundleError(f"{path}: not a bundle (no {MANIFEST_FILE}) nor an engines folder "
                          f"with an active bundle: {exc}") from exc
