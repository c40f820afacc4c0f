"""Ingest throughput: the node against DCMTK's storescp, same files, same storescu.

storescp only writes files; the node also fsyncs each file and its folder and commits a
database row before it answers, which is the price of never losing an acknowledged
image. Processing is held off (a long quiet period) so only ingest is measured.

    .venv/bin/python -m bench.ingest [--small 200] [--large 20]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fractured.training.build import build_untrained_bundle
from tests.factory import write_study
from tests.peers import NodeProcess, Storescp, c_store_statuses, storescu


def timed_send(port: int, called: str, files: list[Path]) -> float:
    start = time.perf_counter()
    proc = storescu(port, files, called=called)
    elapsed = time.perf_counter() - start
    statuses = c_store_statuses(proc.stdout + proc.stderr)
    if statuses != [0] * len(files):
        raise SystemExit(f"not every object was accepted: {statuses[:10]}...")
    return elapsed


def run(label: str, files: list[Path], work: Path, bundle: Path) -> None:
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    def storescp() -> tuple[int, str, Callable[[], object]]:
        scp = Storescp(work / f"storescp-{label}").start()
        return scp.port, scp.ae_title, scp.stop

    def node() -> tuple[int, str, Callable[[], object]]:
        proc = NodeProcess(work / f"node-{label}", bundle, [], quiet_period_s=3600).start()
        return proc.port, proc.ae_title, proc.stop

    peers: list[tuple[str, Callable[[], tuple[int, str, Callable[[], object]]]]] = [
        ("storescp (DCMTK, no fsync)", storescp), ("fractured node", node)]
    times = {}
    for name, start in peers:
        port, ae, stop = start()
        try:
            times[name] = timed_send(port, ae, files)
        finally:
            stop()
        print(f"  {name:<28} {times[name]:7.2f} s  {len(files) / times[name]:7.1f} obj/s  "
              f"{size_mb / times[name]:7.1f} MB/s")
    base, ours = times[peers[0][0]], times[peers[1][0]]
    print(f"  ratio node / storescp: {ours / base:.2f}x the time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="objects of 256x256 px")
    parser.add_argument("--large", type=int, default=20, help="objects of 2048x2048 px")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = build_untrained_bundle(work / "bundle", input_size=128)
        for label, n, side in (("small", args.small, 256), ("large", args.large, 2048)):
            if n <= 0:
                continue
            files = write_study(work / f"{label}-files", n, rows=side, cols=side)
            mb = sum(p.stat().st_size for p in files) / 1e6
            print(f"{label}: {n} objects of {side}x{side} px ({mb:.0f} MB), one storescu run")
            run(label, files, work, bundle)


if __name__ == "__main__":
    main()
