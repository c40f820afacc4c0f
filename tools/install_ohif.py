"""Put the OHIF viewer's built app in .cache/ohif-app for the browser tests.

The npm package `@ohif/app` carries the complete built viewer in its dist/ folder; the
tests serve it themselves (tests/viewer.py), so neither Node.js nor npm is needed: the
tarball comes from the npm registry, pinned by version and checked against the
registry's sha512 before anything is unpacked. Idempotent: an installed copy of the
pinned version is kept. Standard library only (tools/setup.sh runs it before the venv
has anything else).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "3.13.2"
TARBALL = f"https://registry.npmjs.org/@ohif/app/-/app-{VERSION}.tgz"
#: `npm view @ohif/app@3.13.2 dist.integrity`
INTEGRITY = ("sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfp"
             "q+jd5xXZB9E8EA==")
TARGET = Path(__file__).resolve().parents[1] / ".cache" / "ohif-app"


def installed_version(target: Path) -> str | None:
    try:
        return json.loads((target / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def install(target: Path = TARGET) -> None:
    if installed_version(target) == VERSION and (target / "dist" / "index.html").exists():
        return
    with urllib.request.urlopen(TARBALL, timeout=300) as answer:
        data = answer.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != INTEGRITY:
        sys.exit(f"{TARBALL}: sha512 {digest} is not the pinned {INTEGRITY}")
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(partial, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    (partial / "package").rename(target)
    shutil.rmtree(partial)
    print(f"OHIF {VERSION} installed in {target}")


if __name__ == "__main__":
    install()
