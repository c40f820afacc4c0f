"""An engine bundle on disk: manifest.json, the model files, and their checksums.

A bundle is built once by ML staff and never changed: the node refuses to run one whose
files no longer match the sha256 sums in its manifest, so what is named in every result
(name and version) is exactly what produced it. A manifest with an unknown or missing
key is refused too, rather than guessed at, because a silently ignored `threshold` or
`temperature` would change clinical decisions without anyone noticing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import types
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from fractured.engine.findings import ModelInfo

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
CLASSIFIER_FILE = "classifier.onnx"
TASK_CLASSIFICATION = "fracture-classification"
FRACTURE_LABEL = "fracture"


class BundleError(Exception):
    """A bundle that cannot be used; the message names the file and the key or reason."""


@dataclass(frozen=True)
class Manifest:
    """The contents of manifest.json (see ARCHITECTURE.md, "Engine bundle")."""

    schema_version: int
    name: str
    version: str
    created: str  # ISO 8601, UTC
    trained: bool
    task: str
    labels: tuple[str, ...]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    temperature: float  # calibration: probability = sigmoid(logit / temperature)
    threshold: float  # operating point of the fracture decision
    architecture: str
    files: Mapping[str, str]  # file name -> sha256 hex digest
    backends: tuple[str, ...]
    training: Mapping[str, Any]  # free-form summary: data, epochs, metrics

    @classmethod
    def from_dict(cls, data: Any, source: str | Path = MANIFEST_FILE) -> Manifest:
        """Validate a parsed manifest; BundleError names `source` and the offending key."""
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object, got {type(data).__name__}")
        expected = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(expected))
        if unknown:
            raise BundleError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}")
        missing = [key for key in expected if key not in data]
        if missing:
            raise BundleError(f"{source}: missing key(s) {', '.join(map(repr, missing))}")

        def fail(key: str, why: str) -> BundleError:
            return BundleError(f"{source}: key {key!r} {why} (got {data[key]!r})")

        values: dict[str, Any] = {}
        for key in ("name", "version", "created", "task", "architecture"):
            if not isinstance(data[key], str) or not data[key]:
                raise fail(key, "must be a non-empty string")
            values[key] = data[key]
        for key in ("schema_version", "input_size"):
            if not _is_int(data[key]) or data[key] < 1:
                raise fail(key, "must be a positive integer")
            values[key] = data[key]
        if not isinstance(data["trained"], bool):
            raise fail("trained", "must be true or false")
        values["trained"] = data["trained"]
        for key in ("labels", "backends"):
            items = data[key]
            if not (isinstance(items, list) and items
                    and all(isinstance(item, str) and item for item in items)):
                raise fail(key, "must be a non-empty list of strings")
            values[key] = tuple(items)
        for key in ("mean", "std"):
            items = data[key]
            if not (isinstance(items, list) and len(items) == 3 and all(map(_is_number, items))):
                raise fail(key, "must be a list of 3 numbers")
            values[key] = tuple(float(item) for item in items)
        for key in ("temperature", "threshold"):
            if not _is_number(data[key]):
                raise fail(key, "must be a number")
            values[key] = float(data[key])
        if not isinstance(data["training"], dict):
            raise fail("training", "must be an object")
        values["training"] = types.MappingProxyType(dict(data["training"]))
        files = data["files"]
        if not (isinstance(files, dict) and files
                and all(_is_plain_name(name) and _is_sha256(digest)
                        for name, digest in files.items())):
            raise fail("files", "must map plain file names to sha256 hex digests")
        values["files"] = types.MappingProxyType(dict(files))

        if values["schema_version"] != SCHEMA_VERSION:
            raise fail("schema_version", f"is not supported (this node reads {SCHEMA_VERSION})")
        try:
            datetime.fromisoformat(values["created"])
        except ValueError:
            raise fail("created", "must be an ISO 8601 date and time") from None
        if values["task"] != TASK_CLASSIFICATION:
            raise fail("task", f"must be {TASK_CLASSIFICATION!r}")
        if FRACTURE_LABEL not in values["labels"]:
            raise fail("labels", f"must include {FRACTURE_LABEL!r}")
        if not (values["temperature"] > 0 and values["temperature"] < float("inf")):
            raise fail("temperature", "must be a positive finite number")
        if not 0.0 <= values["threshold"] <= 1.0:
            raise fail("threshold", "must be a probability in [0, 1]")
        if CLASSIFIER_FILE not in values["files"]:
            raise fail("files", f"must include {CLASSIFIER_FILE!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON-ready data (lists and dicts), keys in field order."""
        data: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            data[field.name] = value
        return data


@dataclass(frozen=True)
class Bundle:
    """A bundle directory whose manifest is valid and whose files match their checksums."""

    path: Path
    manifest: Manifest

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        """Read and verify a bundle; BundleError names the file that is wrong and why."""
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BundleError(f"{manifest_path}: missing (is {path} an engine bundle?)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path}: unreadable ({exc})") from exc
        manifest = Manifest.from_dict(data, manifest_path)
        for name, expected in manifest.files.items():
            file_path = path / name
            try:
                actual = _sha256(file_path)
            except FileNotFoundError:
                raise BundleError(f"{file_path}: listed in {MANIFEST_FILE} but missing") from None
            if actual != expected:
                raise BundleError(f"{file_path}: sha256 {actual} does not match {expected} in "
                                  f"{MANIFEST_FILE}; the bundle was changed after it was built")
        return cls(path=path, manifest=manifest)

    def file(self, name: str) -> Path:
        """Path of one of the bundle's verified files."""
        if name not in self.manifest.files:
            raise BundleError(f"{self.path}: has no file {name!r} "
                              f"(it holds {', '.join(sorted(self.manifest.files))})")
        return self.path / name

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self.manifest.name, version=self.manifest.version,
                         trained=self.manifest.trained)


def write_bundle(out_dir: str | Path, manifest_fields: Mapping[str, Any],
                 files: Mapping[str, str | Path]) -> Bundle:
    """Create a bundle at `out_dir` from model files and every manifest key but `files`.

    `files` maps each name in the bundle to the file to copy there; the checksums are
    computed here. Everything is written to a temporary directory beside `out_dir` and
    renamed into place, so a crash or a failed validation never leaves half a bundle
    under the final name. An existing non-empty `out_dir` is refused: bundles are
    immutable, and a new build gets a new version.
    """
    out_dir = Path(out_dir)
    if "files" in manifest_fields:
        raise ValueError("manifest_fields must not contain 'files': checksums are computed here")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise BundleError(f"{out_dir}: already exists (and is not an empty directory); "
                          "a bundle is never overwritten (build a new version)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        digests = {}
        for name, source in files.items():
            if not _is_plain_name(name) or name == MANIFEST_FILE:
                raise BundleError(f"{name!r}: not a valid bundle file name")
            target = staging / name
            shutil.copyfile(source, target)
            _fsync(target)
            digests[name] = _sha256(target)
        manifest = Manifest.from_dict({**manifest_fields, "files": digests},
                                      f"{out_dir / MANIFEST_FILE} (being written)")
        manifest_path = staging / MANIFEST_FILE
        manifest_path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n",
                                 encoding="utf-8")
        _fsync(manifest_path)
        _fsync(staging)
        try:
            # rename(2) replaces an empty directory and fails on a non-empty one, so a
            # bundle that appeared since the check above is still never overwritten.
            staging.rename(out_dir)
        except OSError as exc:
            raise BundleError(f"{out_dir}: cannot create the bundle ({exc})") from exc
        _fsync(out_dir.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return Bundle.load(out_dir)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so the rename publishes complete contents."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_sha256(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(char in "0123456789abcdef" for char in value))


def _is_plain_name(name: Any) -> bool:
    """A file name with no directory part, so a manifest cannot point outside its bundle."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and "/" not in name and "\\" not in name)
