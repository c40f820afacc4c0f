"""End to end with Orthanc as the PACS: studies per minute and the radiologist's wait.

Orthanc (with deploy/orthanc/autoroute.lua) routes N studies of 1-4 real-size images to
the node; the node analyses each once its quiet period has passed and stores an SR and
one overlay per image back into Orthanc. Printed: throughput over the whole run, and per
study the latency from the last image the node received to the last result stored in
Orthanc (p50, p95), with the quiet period (a setting, not work) shown separately, and
Orthanc's own routing delay (its StableAge) for scale.

By default the node runs an untrained B0 bundle with `--detector`; `--bundle` (repeatable)
runs built bundles instead, the shipped one for the radiologist's real wait, each against
a fresh Orthanc and node on studies of the same sizes, and prints each one's figures over the
first's.

The images are phantoms of `--size` that name their body part (LEG) and fill the whole
frame: a bundle's region check and exposed-field search have nothing to do. `--films`
sends copies of real CR films instead, pydicom-data's WG04 lower leg (1760x1760,
MONOCHROME1, collimated; one uncompressed, one JPEG 2000 lossless), whose Body Part
Examined says only EXTREMITY: the node decodes JPEG 2000, searches the exposed field and
runs the region check on every image, the path a PACS's real studies take.

    .venv/bin/python -m bench.e2e [--studies 10] [--size 2000x1700 | --films] [--quiet 2]
        [--detector mobilenet_v3_large_fpn|none] [--bundle engines/B [--bundle ...]]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from fractured.training.build import build_untrained_bundle
from tests.factory import write_study
from tests.peers import NodeProcess, Orthanc, routing_pacs_and_node

POLL_S = 0.2
#: The real films `--films` sends (pydicom-data, a test dependency): lower legs on CR.
FILMS = ("RG3_UNCR.dcm", "RG3_J2KR.dcm")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--size", default="2000x1700", help="rows x columns of each image")
    parser.add_argument("--films", action="store_true",
                        help="real CR films of a lower leg (pydicom-data) instead of phantoms")
    parser.add_argument("--quiet", type=float, default=2.0, help="[study].quiet_period_s")
    parser.add_argument("--detector", default="mobilenet_v3_large_fpn")
    parser.add_argument("--bundle", action="append", type=Path, default=[],
                        help="a built bundle to run instead of an untrained one (repeatable)")
    args = parser.parse_args()
    rows, cols = (int(v) for v in args.size.split("x"))
    figures: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fractured-e2e-") as scratch:
        root = Path(scratch)
        detector = None if args.detector == "none" else args.detector
        bundles = [b.resolve() for b in args.bundle] or [build_untrained_bundle(
            root / "engines" / "bench", detector=detector)]
        for index, bundle in enumerate(bundles):
            label = bundle.name if args.bundle else f"untrained b0 + {args.detector}"
            print(f"== {label}")
            figures[label] = one_node(args, rows, cols, root / f"run{index}", bundle)
    first, *others = figures
    for label in others:
        print(f"{label} / {first}: " + ", ".join(
            f"{key} {figures[label][key] / figures[first][key]:.2f}x"
            for key in ("studies_per_min", "latency_p50", "work_p50")))


def one_node(args: argparse.Namespace, rows: int, cols: int, root: Path,
             bundle: Path) -> dict[str, float]:
    """Orthanc and a node running `bundle` under `root`, the studies through them."""
    orthanc, node = routing_pacs_and_node(root, bundle, quiet_period_s=args.quiet)
    orthanc.start()
    node.start()
    try:
        return run(args, rows, cols, root, orthanc, node)
    finally:
        node.stop()
        orthanc.stop()


def run(args: argparse.Namespace, rows: int, cols: int, root: Path, orthanc: Orthanc,
        node: NodeProcess) -> dict[str, float]:
    studies = []
    for index in range(args.studies):
        images, folder, patient = index % 4 + 1, root / f"study{index}", f"BENCH-{index:03d}"
        studies.append(film_study(folder, images, patient) if args.films else
                       write_study(folder, images, rows=rows, cols=cols, patient_id=patient))
    started = time.time()
    uploaded: dict[str, float] = {}
    expected: dict[str, int] = {}
    for files in studies:
        for path in files:
            answer = orthanc.post("/instances", path.read_bytes())
        uploaded[answer["ParentStudy"]] = time.time()
        expected[answer["ParentStudy"]] = len(files)
    done: dict[str, float] = {}
    deadline = time.time() + 600
    while len(done) < len(expected) and time.time() < deadline:
        for study_id, images in expected.items():
            if study_id not in done and _complete(orthanc, study_id, images):
                done[study_id] = time.time()
        time.sleep(POLL_S)
    wall = time.time() - started
    if len(done) < len(expected):
        raise SystemExit(f"only {len(done)} of {len(expected)} studies got their results")
    received = _last_received(node)
    uids = {study_id: orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
            for study_id in expected}
    latency = [done[s] - received[uids[s]] for s in expected]
    routing = [received[uids[s]] - uploaded[s] for s in expected]
    work = [value - args.quiet for value in latency]
    images = sum(expected.values())
    sizes = "real lower-leg CR films" if args.films else f"{rows}x{cols}"
    print(f"{len(expected)} studies, {images} images of {sizes}, quiet period "
          f"{args.quiet:g} s, poll {POLL_S:g} s")
    print(f"throughput: {60 * len(expected) / wall:.1f} studies/min, "
          f"{60 * images / wall:.1f} images/min ({wall:.1f} s wall)")
    print(f"last image received -> last result in Orthanc: p50 {percentile(latency, .5):.1f} s, "
          f"p95 {percentile(latency, .95):.1f} s")
    print(f"  of which the quiet period {args.quiet:g} s; analysis + delivery p50 "
          f"{percentile(work, .5):.1f} s, p95 {percentile(work, .95):.1f} s")
    print(f"Orthanc upload -> node received (its StableAge and routing): p50 "
          f"{percentile(routing, .5):.1f} s")
    print(f"analysis share of the wait: {statistics.median(work) / statistics.median(latency):.2f}")
    return {"studies_per_min": 60 * len(expected) / wall,
            "latency_p50": percentile(latency, .5), "work_p50": percentile(work, .5)}


def film_study(folder: Path, images: int, patient_id: str) -> list[Path]:
    """A study of `images` copies of the FILMS in turn, each a new instance of one new
    study and series for `patient_id`."""
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for number in range(1, images + 1):
        ds = pydicom.dcmread(get_testdata_file(FILMS[(number - 1) % len(FILMS)]))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.InstanceNumber = patient_id, number
        paths.append(folder / f"{number}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _complete(orthanc: Orthanc, study_id: str, images: int) -> bool:
    """Whether the study's SR and an overlay of each image are in Orthanc."""
    series = orthanc.get(f"/studies/{study_id}/series")
    counts: Counter[str] = Counter()
    for one in series:
        counts[one["MainDicomTags"].get("Modality", "")] += len(one["Instances"])
    received = sum(count for modality, count in counts.items() if modality in ("CR", "DX"))
    return received == images and counts.get("OT") == images and counts.get("SR") == 1


def _last_received(node: NodeProcess) -> dict[str, float]:
    """The time the node accepted each study's last image (its own log, UTC)."""
    last: dict[str, float] = {}
    for event in node.events("store.accepted"):
        when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
        uid = event["study_instance_uid"]
        last[uid] = max(last.get(uid, 0.0), when)
    return last


if __name__ == "__main__":
    main()
