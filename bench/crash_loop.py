"""Crash loop: a poison study among ordinary ones, and a listener that must keep answering.

Two kinds of poison, each among `--studies` ordinary studies sent with storescu to a
node process that delivers to DCMTK storescp, while echoscu asks the node every half
second:

- **the decoder dies on an image** (a decoder crash, the OOM killer taking the largest
  process): the bench SIGKILLs the node's decoder process whenever it decodes the
  poison study. The node replaces it, reports that image undecodable and goes on; no
  restart.
- **the node's own process dies on a study** (a native crash in inference): the bench
  SIGKILLs the node whenever it claims the poison study (16 images of 2000 x 1600, so
  that its run lasts long enough to be caught) and starts it again, as
  systemd's Restart= would. After [worker].max_claims claims (3) the study is FAILED
  ("worker died 3 times on this study") instead of being claimed for ever.

Printed: whether every ordinary study was delivered (one SR each at storescp), the
poison study's end, the kills and restarts, and the C-ECHOs answered of those asked,
with the longest time the listener did not answer.

    .venv/bin/python -m bench.crash_loop [--studies 5]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from fractured.training.build import build_untrained_bundle
from tests.factory import write_study
from tests.integration.test_decoding import decoder_pid
from tests.peers import NodeProcess, Storescp, echoscu, storescu, wait_for


class Echoes:
    """echoscu every half second on a thread: answered, asked, longest silence."""

    def __init__(self, node: NodeProcess) -> None:
        self.node, self.asked, self.answered = node, 0, 0
        self.longest_gap_s, self._last = 0.0, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Echoes:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.asked += 1
            if echoscu(self.node.port, extra=["-to", "5"]).returncode == 0:
                now = time.monotonic()
                self.longest_gap_s = max(self.longest_gap_s, now - self._last)
                self._last = now
                self.answered += 1

    def report(self) -> str:
        return (f"C-ECHO answered {self.answered} of {self.asked}, longest without an "
                f"answer {self.longest_gap_s:.1f} s")


def send(node: NodeProcess, folder: Path, studies: int) -> list[str]:
    uids = []
    for i in range(studies):
        files = write_study(folder / f"s{i}", 2)
        uids.append(str(pydicom.dcmread(files[0]).StudyInstanceUID))
        assert storescu(node.port, files).returncode == 0
    return uids


def states(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {s["study_instance_uid"]: s for s in node.status()["study_list"]}


def node_and_pacs(root: Path, bundle: Path, name: str) -> tuple[NodeProcess, Storescp]:
    pacs = Storescp(root / f"pacs-{name}").start()
    node = NodeProcess(root / f"node-{name}", bundle,
                       [{"name": "pacs", "ae_title": pacs.ae_title, "port": pacs.port}],
                       quiet_period_s=1).start()
    return node, pacs


def decoder_dies(root: Path, bundle: Path, studies: int) -> None:
    node, pacs = node_and_pacs(root, bundle, "a")
    kills = 0
    try:
        with Echoes(node) as echoes:
            poison_files = write_study(root / "poison-a", 1)
            poison = str(pydicom.dcmread(poison_files[0]).StudyInstanceUID)
            frozen = decoder_pid(node)
            os.kill(frozen, signal.SIGSTOP)  # caught at the poison image, then killed
            assert storescu(node.port, poison_files).returncode == 0
            wait_for("the poison study to be claimed",
                     lambda: node.events("study.claimed"), 60)
            time.sleep(1)
            os.kill(frozen, signal.SIGKILL)
            kills += 1
            ordinary = send(node, root / "ordinary-a", studies)
            wait_for("every study to settle", lambda: all(
                states(node).get(u, {}).get("state") in ("done", "skipped", "failed")
                for u in [poison, *ordinary]), 300)
        rows = states(node)
        delivered = sum(rows[u]["state"] == "done" for u in ordinary)
        print(f"decoder killed {kills} time(s) on the poison study's image: node process "
              f"restarts 0; poison study {rows[poison]['state']} "
              f"({rows[poison].get('reason') or 'its images left out, the SR says why'}); "
              f"ordinary studies delivered {delivered} of {studies}; {echoes.report()}")
    finally:
        node.stop()
        pacs.stop()


def node_dies(root: Path, bundle: Path, studies: int) -> None:
    node, pacs = node_and_pacs(root, bundle, "b")
    restarts = 0
    try:
        with Echoes(node) as echoes:
            # many large images, so that its run lasts seconds and the kill lands in it
            poison_files = write_study(root / "poison-b", 16, rows=2000, cols=1600)
            poison = str(pydicom.dcmread(poison_files[0]).StudyInstanceUID)
            assert storescu(node.port, poison_files).returncode == 0
            ordinary = send(node, root / "ordinary-b", studies)
            deadline, seen = time.monotonic() + 600, 0
            while time.monotonic() < deadline:
                claimed = [e for e in node.events("study.claimed")
                           if e["study_instance_uid"] == poison]
                if len(claimed) > seen:
                    seen = len(claimed)
                    node.stop(signal.SIGKILL)  # the crash, then systemd's Restart=
                    restarts += 1
                    node.start()
                    continue
                rows = states(node)
                if all(rows.get(u, {}).get("state") in ("done", "failed")
                       for u in [poison, *ordinary]):
                    break
                time.sleep(0.2)
        rows = states(node)
        delivered = sum(rows[u]["state"] == "done" for u in ordinary)
        print(f"node killed at each claim of the poison study: restarts {restarts}; "
              f"poison study {rows[poison]['state']} ({rows[poison].get('reason')}); "
              f"ordinary studies delivered {delivered} of {studies}; {echoes.report()}")
    finally:
        node.stop()
        pacs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        bundle = build_untrained_bundle(root / "engines" / "untrained", input_size=128)
        decoder_dies(root, bundle, args.studies)
        node_dies(root, bundle, args.studies)


if __name__ == "__main__":
    main()
