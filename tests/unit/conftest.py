"""The unit tier's rules, enforced: no torch, no process started, no sleeping.

A test that breaks one fails saying which, instead of slowing the tier down unnoticed;
it belongs in tests/models (torch) or tests/integration (processes, waiting).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

UNIT = Path(__file__).resolve().parent


def pytest_collection_finish(session: pytest.Session) -> None:
    """Running the unit tier alone must not import torch, even while collecting."""
    if session.items and all(item.path.resolve().is_relative_to(UNIT)
                             for item in session.items) and "torch" in sys.modules:
        raise pytest.UsageError("the unit tier imported torch while collecting: a module "
                                "under tests/unit imports something that needs it")


def _refused(what: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """`original`, refused on the test's own thread (other threads are left alone)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            raise AssertionError(f"a unit test must not {what}: move it to "
                                 "tests/integration")
        return original(*args, **kwargs)
    return call


@pytest.fixture(autouse=True)
def _unit_rules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    had_torch = "torch" in sys.modules
    monkeypatch.setattr(subprocess.Popen, "__init__",
                        _refused("start a process", subprocess.Popen.__init__))
    monkeypatch.setattr(time, "sleep", _refused("sleep", time.sleep))
    yield
    assert had_torch or "torch" not in sys.modules, (
        "a unit test imported torch: move it to tests/models")
