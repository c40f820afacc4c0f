"""Ingest throughput: the node against the floor of its own stack and against DCMTK.

Three receivers, the same files, the same DCMTK storescu senders, in one run:

- the node (`fractured serve`, processing held off by a long quiet period): checks,
  fsyncs the file and its folder, commits a database row, then answers;
- a bare pynetdicom receiver (bench/bare_receiver.py) that only writes each object
  durably as the node does (fractured.durable): the floor of our own stack;
- DCMTK's storescp, which writes files without fsync (started with TCP_NODELAY=1:
  Debian's DCMTK keeps Nagle's algorithm on otherwise, ~40 ms lost per object).

For 200 small objects (~130 kB) and 16 large ones (~8 MB), over one association and
over 8 concurrent ones, it prints objects/s and MB/s per receiver and the ratios the
project aims at: the node within 20 % of the bare receiver, at least 0.5x storescp on
large objects, and no collapse with concurrent associations.

    .venv/bin/python -m bench.ingest [--small 200] [--large 16] [--concurrent 8] [--repeat 3]

One run of each varies by 20 % or more on a shared machine (the bare receiver's 200
small objects took 0.87 s and 1.07 s in two runs minutes apart): each figure is the
median of `--repeat` interleaved runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fractured.training.build import build_untrained_bundle
from tests.factory import write_study
from tests.peers import (
    NodeProcess,
    Sender,
    Storescp,
    c_store_statuses,
    free_port,
    port_open,
    wait_for,
)

Receiver = tuple[int, str, Callable[[], object]]  # port, AE title, stop


def send(port: int, ae_title: str, files: list[Path], associations: int, logs: Path) -> float:
    """Seconds for `associations` storescu runs in parallel to store every file."""
    groups = [files[i::associations] for i in range(associations)]
    start = time.perf_counter()
    senders = [Sender(port, group, logs / f"storescu-{i}.log", called=ae_title)
               for i, group in enumerate(groups) if group]
    outputs = [s.output() for s in senders]
    elapsed = time.perf_counter() - start
    statuses = [status for out in outputs for status in c_store_statuses(out)]
    if statuses != [0] * len(files):
        raise SystemExit(f"not every object was accepted: {len(statuses)} answers, "
                         f"{sum(s != 0 for s in statuses)} failures")
    return elapsed


def bare_receiver(folder: Path) -> Receiver:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_receiver", str(port),
                             str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("the bare receiver to listen", lambda: port_open(port), 30)

    def stop() -> None:
        proc.terminate()
        proc.wait(30)
    return port, "BARE", stop


def storescp(folder: Path) -> Receiver:
    scp = Storescp(folder).start()
    return scp.port, scp.ae_title, scp.stop


def node(folder: Path, bundle: Path) -> Receiver:
    proc = NodeProcess(folder, bundle, [], quiet_period_s=3600).start()
    return proc.port, proc.ae_title, proc.stop


def measure(label: str, files: list[Path], work: Path, bundle: Path, concurrent: int,
            repeat: int) -> None:
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    receivers: dict[str, Callable[[Path], Receiver]] = {
        "storescp (DCMTK, no fsync)": storescp,
        "bare pynetdicom + fsync": bare_receiver,
        "fractured node": lambda folder: node(folder, bundle),
    }
    times: dict[tuple[str, int], float] = {}
    for associations in (1, concurrent):
        print(f"  {associations} association{'s' if associations > 1 else ''}:")
        runs: dict[str, list[float]] = {name: [] for name in receivers}
        for attempt in range(repeat):  # interleaved, so a busy moment hits all three
            for name, start in receivers.items():
                folder = work / f"{label}-{associations}-{name.split()[0]}-{attempt}"
                logs = folder.with_name(folder.name + "-logs")
                logs.mkdir(parents=True)
                port, ae_title, stop = start(folder)
                try:
                    runs[name].append(send(port, ae_title, files, associations, logs))
                finally:
                    stop()
        for name, seconds_each in runs.items():
            times[name, associations] = seconds = statistics.median(seconds_each)
            print(f"    {name:<28} {seconds:7.2f} s  {len(files) / seconds:7.1f} obj/s  "
                  f"{size_mb / seconds:7.1f} MB/s  (median of {repeat})")
    for associations in (1, concurrent):
        ours = times["fractured node", associations]
        bare = times["bare pynetdicom + fsync", associations]
        dcmtk = times["storescp (DCMTK, no fsync)", associations]
        print(f"  {associations} assoc.: node throughput {bare / ours:.2f}x the bare receiver's "
              f"(aim >= 0.8), {dcmtk / ours:.2f}x storescp's"
              + (" (aim >= 0.5)" if label == "large" else ""))
    one, many = times["fractured node", 1], times["fractured node", concurrent]
    print(f"  node with {concurrent} associations: {one / many:.2f}x its one-association "
          "throughput (no collapse: >= 1 on a machine with cores to spare)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=200, help="objects of 256x256 px")
    parser.add_argument("--large", type=int, default=16, help="objects of 2048x2048 px")
    parser.add_argument("--concurrent", type=int, default=8, help="parallel associations")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per receiver, interleaved; the median is printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = build_untrained_bundle(work / "bundle", input_size=128)
        for label, n, side in (("small", args.small, 256), ("large", args.large, 2048)):
            if n <= 0:
                continue
            files = write_study(work / f"{label}-files", n, rows=side, cols=side)
            mb = sum(p.stat().st_size for p in files) / 1e6
            print(f"{label}: {n} objects of {side}x{side} px ({mb:.0f} MB)")
            measure(label, files, work, bundle, args.concurrent, args.repeat)


if __name__ == "__main__":
    main()
