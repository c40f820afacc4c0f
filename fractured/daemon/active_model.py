"""The models the worker runs, following an engines folder's pointers between studies.

The worker asks for the pipeline once per claimed study and keeps it for the whole
study, so a roll-out (`fractured engines activate`) or a rollback takes effect at the
next study: none is split between two models, no association is dropped, and every SR
and overlay names the version that made it. A bundle that fails to load when a pointer
moves is logged (`engine.switch_failed`) and the current model keeps serving: a bad
roll-out never stops the node. A fixed bundle path never changes and has no shadow.

The shadow pointer (`fractured engines shadow NAME`) is followed the same way; its
pipeline runs each study after the real results are queued (daemon.shadow).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fractured import log
from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.registry import (
    ACTIVE_FILE,
    SHADOW_FILE,
    Registry,
    is_bundle,
    resolve_bundle,
)

_log = log.get("fractured.engine")


class ActiveModel:
    """The current Pipeline for `location` (a bundle, or an engines folder), and the
    shadow one when the engines folder names a candidate."""

    def __init__(self, location: Path, build: Callable[[Bundle], Pipeline]) -> None:
        self.location = Path(location)
        self._build = build
        bundle = resolve_bundle(self.location)  # BundleError says what is wrong
        self._registry = None if is_bundle(self.location) else Registry(self.location)
        self.pipeline = build(bundle)
        self._pointers: dict[str, str | None] = {ACTIVE_FILE: None, SHADOW_FILE: None}
        self._shadow: Pipeline | None = None
        if self._registry is not None:
            self._pointers[ACTIVE_FILE] = self._registry.active()

    def current(self) -> Pipeline:
        """The pipeline to run the next study with (switching first if ACTIVE moved)."""
        changed, name = self._moved(ACTIVE_FILE)
        if not changed or name is None:
            return self.pipeline
        previous = self.pipeline.model
        pipeline = self._load(name, "engine.switch_failed", serving=previous.label)
        if pipeline is None:
            return self.pipeline
        self.pipeline = pipeline
        model = pipeline.model
        _log.info("engine.switched", engines=str(self.location), bundle=name,
                  previous=previous.label, model=model.label, trained=model.trained,
                  backend=pipeline.backend_name)
        if not model.trained:
            _log.warning("model.untrained", model=model.label,
                         detail="results are marked UNTRAINED MODEL and mean nothing")
        return self.pipeline

    def shadow(self) -> Pipeline | None:
        """The candidate pipeline to shadow the next study with, if any."""
        changed, name = self._moved(SHADOW_FILE)
        if changed:
            self._shadow = None if name is None else self._load(name, "shadow.load_failed")
            if self._shadow is not None:
                _log.info("shadow.started", bundle=name, model=self._shadow.model.label)
            elif name is None:
                _log.info("shadow.stopped")
        return self._shadow

    def _moved(self, pointer: str) -> tuple[bool, str | None]:
        """(whether `pointer` changed since last asked, its bundle name now)."""
        if self._registry is None:
            return False, None
        try:
            name = self._registry.pointer(pointer)
        except OSError as exc:
            _log.error("engine.pointer_unreadable", engines=str(self.location),
                       pointer=pointer, error=str(exc))
            return False, self._pointers[pointer]
        if name == self._pointers[pointer]:
            return False, name
        self._pointers[pointer] = name  # tried once per change, not once per study
        return True, name

    def _load(self, name: str, failure: str, **context: str) -> Pipeline | None:
        assert self._registry is not None
        try:
            return self._build(self._registry.bundle(name))
        except Exception as exc:  # any failure to load (checksums, ONNX Runtime, memory)
            _log.error(failure, engines=str(self.location), bundle=name, error=str(exc),
                       **context)
            return None
