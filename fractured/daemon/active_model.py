"""The model the worker runs, following an engines folder's ACTIVE pointer between studies.

The worker asks for the pipeline once per claimed study and keeps it for the whole
study, so a roll-out (`fractured engines activate`) or a rollback takes effect at the
next study: none is split between two models, no association is dropped, and every SR
and overlay names the version that made it. A bundle that fails to load when the
pointer moves is logged (`engine.switch_failed`) and the current model keeps serving:
a bad roll-out never stops the node. A fixed bundle path never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fractured import log
from fractured.engine.bundle import Bundle
from fractured.engine.pipeline import Pipeline
from fractured.engine.registry import Registry, is_bundle, resolve_bundle

_log = log.get("fractured.engine")


class ActiveModel:
    """The current Pipeline for `location` (a bundle, or an engines folder)."""

    def __init__(self, location: Path, build: Callable[[Bundle], Pipeline]) -> None:
        self.location = Path(location)
        self._build = build
        bundle = resolve_bundle(self.location)  # BundleError says what is wrong
        self._registry = None if is_bundle(self.location) else Registry(self.location)
        self._pointer = self._registry.active() if self._registry else None
        self.pipeline = build(bundle)

    def current(self) -> Pipeline:
        """The pipeline to run the next study with (switching first if ACTIVE moved)."""
        if self._registry is None:
            return self.pipeline
        try:
            pointer = self._registry.active()
        except OSError as exc:
            _log.error("engine.switch_failed", engines=str(self.location), error=str(exc),
                       serving=self.pipeline.model.label)
            return self.pipeline
        if pointer == self._pointer:
            return self.pipeline
        self._pointer = pointer  # tried once per change, not once per study
        previous = self.pipeline.model
        try:
            self.pipeline = self._build(self._registry.active_bundle())
        except Exception as exc:  # any failure to load (checksums, ONNX Runtime, memory)
            _log.error("engine.switch_failed", engines=str(self.location), bundle=pointer,
                       error=str(exc), serving=previous.label)
            return self.pipeline
        model = self.pipeline.model
        _log.info("engine.switched", engines=str(self.location), bundle=pointer,
                  previous=previous.label, model=model.label, trained=model.trained,
                  backend=self.pipeline.backend_name)
        if not model.trained:
            _log.warning("model.untrained", model=model.label,
                         detail="results are marked UNTRAINED MODEL and mean nothing")
        return self.pipeline
