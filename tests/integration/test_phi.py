"""No patient data in the log, the metrics or a stored reason, at any level.

A study whose patient attributes hold invalid values (tests.phi: libraries quote such
values in their warnings and errors) goes through the listener, the worker and the
sender, each in a fresh node process at log level debug (Python shows a warning once
per place and process, so what one path said must not hide what the next would);
everything each process wrote, its /metrics and every text the database stores are
searched for each value. And the header reader the worker uses, alone in a fresh
process under the node's logging, where the leak was first seen.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text

from tests import phi
from tests.peers import NodeProcess, Storescp, c_store_statuses, storescu, wait_for

pytestmark = pytest.mark.peers


def stored_texts(database: Path) -> str:
    """Every value of every table of the node's database, as one text."""
    engine = create_engine(f"sqlite:///{database}")
    with engine.connect() as conn:
        return "\n".join(str(row) for table in inspect(engine).get_table_names()
                         for row in conn.execute(text(f"SELECT * FROM {table}")))


def scrape(node: NodeProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics",
                                timeout=30) as rsp:
        return rsp.read().decode()


def state(node: NodeProcess, uid: str) -> str | None:
    return next((s["state"] for s in node.status()["study_list"]
                 if s["study_instance_uid"] == uid), None)


def test_no_patient_value_reaches_a_log_a_metric_or_a_reason(tmp_path: Path,
                                                             untrained_bundle: Path) -> None:
    uid, files = phi.write_study(tmp_path / "study")
    pacs = Storescp(tmp_path / "pacs")
    node = NodeProcess(tmp_path / "node", untrained_bundle,
                       [{"name": "pacs", "ae_title": pacs.ae_title, "port": pacs.port}],
                       quiet_period_s=3600,
                       delivery={"retry_interval_s": 1.0, "max_retry_interval_s": 1.0,
                                 "max_attempts": 100}, log_level="debug")
    logs: dict[str, str] = {}
    metrics: dict[str, str] = {}

    def run(phase: str, until: object) -> None:
        node.start()
        try:
            if phase == "listener":
                sent = storescu(node.port, files)
                assert c_store_statuses(sent.stdout + sent.stderr) == [0] * len(files)
            wait_for(f"the {phase} to do its part", until, 120)
            metrics[phase] = scrape(node)
        finally:
            node.stop()
            logs[phase] = node.log_text()
            (node.folder / "node.log").unlink()

    # the listener alone (the study waits an hour), the worker (the PACS is down: the
    # deliveries wait), the sender (the PACS is up)
    run("listener", lambda: state(node, uid) == "receiving")
    node.quiet_period_s = 1
    run("worker", lambda: state(node, uid) == "delivering")
    pacs.start()
    try:
        run("sender", lambda: state(node, uid) == "done")
    finally:
        pacs.stop()
    assert len(pacs.files()) == len(files) + 1  # an SR and an overlay per image
    for phase, log in logs.items():
        assert log.count("\n") > 5, f"the {phase} logged nothing?"
        assert phi.leaks(log) == [], f"the {phase}'s log holds patient data"
        assert phi.leaks(metrics[phase]) == [], f"/metrics holds patient data ({phase})"
    assert phi.leaks(stored_texts(node.folder / "fractured.db")) == []


def test_the_header_reader_alone_logs_no_patient_value(tmp_path: Path) -> None:
    """What the worker does to a source's header, in a fresh process with the node's
    logging at debug: read it, check it, repair it for copying."""
    _, (path, _) = phi.write_study(tmp_path / "study")
    script = (
        "import sys\n"
        "from fractured import log\n"
        "log.configure('debug', 'json')\n"
        "from fractured.engine.preprocess import read_dataset, display_pixels\n"
        "from fractured.results.header import header_repairs, study_header\n"
        "ds = read_dataset(sys.argv[1])\n"
        "display_pixels(ds)\n"
        "header_repairs(ds)\n"
        "study_header(ds)\n"
        "print('read', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "read" in proc.stderr
    assert phi.leaks(proc.stdout + proc.stderr) == []


def test_libraries_quoting_a_value_are_silenced_under_the_nodes_logging() -> None:
    """Whatever path: pydicom asked to take an invalid birth date, name and ID, and
    to read back invalid values, highdicom given a name it finds odd, in a fresh
    process logging as the node does. Before, pydicom's logger and Python's warnings
    both wrote "Invalid value for VR DA: '1961-11-29'"."""
    script = (
        "import sys\n"
        "from fractured import log\n"
        "log.configure('debug', 'json')\n"
        "import highdicom, pydicom\n"
        "from pydicom.dataset import Dataset\n"
        "from tests import phi\n"
        "ds = phi.with_invalid_values(Dataset())\n"
        "ds.PatientAge = 'QZ45 years'\n"
        "ds.PatientSex = 'QZfemale'\n"
        "for element in ds:\n"
        "    element.value\n"
        "highdicom.sr.PersonObserverIdentifyingAttributes(name='Qzname Doe')\n"
        "print('done', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr
    assert "done" in proc.stderr
    captured = proc.stdout + proc.stderr
    assert phi.leaks(captured) == [] and "QZ45" not in captured
    assert "QZfemale" not in captured
