"""The fault loop of bench/faults.py, a few cycles: SIGKILL at random moments loses no
acknowledged instance and delivers each study's results exactly once."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.faults import fault_loop

pytestmark = [pytest.mark.peers, pytest.mark.slow]


def test_sigkill_at_random_moments_loses_nothing_and_delivers_once(
        tmp_path: Path, untrained_bundle: Path) -> None:
    counts = fault_loop(tmp_path, untrained_bundle, cycles=4, instances=30, seed=2)
    print(counts.report())
    assert counts.cycles == 4
    assert counts.lost == []
    assert counts.temporary_left == 0
    assert counts.held_after_restart == counts.acknowledged_before_kill
    assert counts.sr_per_study == {1: 4}
    assert counts.overlay_mismatches == []
