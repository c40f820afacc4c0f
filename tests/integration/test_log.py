"""Log lines as journald and a terminal-less stderr get them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROGRAM = ("from fractured import log; log.configure('info'); l = log.get('t'); "
           "l.info('node.started', port=1); l.warning('access.open'); "
           "l.error('store.failed', reason='spool_unwritable'); l.debug('hidden')")


def run(stderr_file: Path, journal: bool) -> list[str]:
    with stderr_file.open("wb") as err:
        st = os.fstat(err.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}" if journal
               else "0:0"}
        subprocess.run([sys.executable, "-c", PROGRAM], stderr=err, env=env, check=True)
    return stderr_file.read_text().splitlines()


@pytest.mark.parametrize("journal", [True, False])
def test_lines_carry_a_syslog_priority_only_on_the_journal_stream(
        tmp_path: Path, journal: bool) -> None:
    lines = run(tmp_path / "stderr", journal)
    assert len(lines) == 3  # debug is below [log].level
    if journal:
        assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
        lines = [line[3:] for line in lines]
    events = [json.loads(line) for line in lines]  # JSON: stderr is not a terminal
    assert [(e["event"], e["level"]) for e in events] == [
        ("node.started", "info"), ("access.open", "warning"), ("store.failed", "error")]
