"""Inference engines: torch eager against ONNX Runtime, per model, per study and in memory.

The node defaults to ONNX Runtime and keeps torch as the reference (and the GPU path
where TensorRT is absent); this says what that choice is worth on the node's own
hardware. For each classifier variant at its native input size and each detector
backbone at 512 px, an untrained bundle is built (BatchNorm calibrated, so outputs and
the work done on them are realistic) and both backends time the same inputs in the same
process (in alternating blocks of runs: see `race`). Then:

- the end-to-end `Pipeline.run` over a 4-image study of ~2000x1700 display images
  (synthetic radiograph-like pixels), classifier and detector, on each backend; for a
  built bundle twice, with DICOM headers that name the body part (as a PACS sends) and
  without (a PNG's case: a bundle with a region check runs it on every image);
- the node's peak memory (peak resident set) with both models loaded and one study run, each
  backend in a fresh subprocess so that imports and allocator arenas are counted;
- on a CUDA machine, the torch backend on the GPU: its FP16 channels-last classifier
  (a CUDA graph per batch size) against itself eager and against FP32 eager, its
  detector against the CPU, the pipeline against ONNX Runtime on the CPU, and the GPU
  memory of both models with one study (`--gpu-only`: only this).

Times go through the backends' own `.run` (what the node calls), so they include the
numpy <-> tensor conversions the node pays for.

    .venv/bin/python -m bench.engine [--variants b0,b3] [--detectors mobilenet_v3_large_fpn]
        [--threads 2] [--repeat 10] [--batch 1,4] [--bundle engines/fractured-0.8.1
        [--peer-bundle engines/fractured-0.7.0]]

The ResNet50-FPN v2 detector (~1.3 s per image on 2 cores) runs only when named:
`--detectors mobilenet_v3_large_fpn,resnet50_fpn_v2`. `--detectors none` skips detectors.
"""

# torch (and fractured.training.build, which imports it) is imported inside the
# functions that need it, never here: the memory probe runs this module in a subprocess
# for the ONNX Runtime node, which must not be charged for a torch it never loads.

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from fractured.engine.backends import LoadedModels, open_models
from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    CLASSIFIER_WEIGHTS,
    DETECTOR_FILE,
    DETECTOR_WEIGHTS,
    Bundle,
    BundleError,
    write_bundle,
)
from fractured.engine.findings import ImageRef
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import letterbox, to_model_input

DETECTOR_SIZE = 512
WARMUP = 2  # first runs allocate arenas and pick kernels; never timed
ROUNDS = 2  # blocks of timed runs per contender, alternating between contenders
# Source sizes of the synthetic study: portrait and landscape, so both letterbox axes pad.
STUDY_SHAPES = ((2000, 1700), (1700, 2000), (2048, 1680), (1950, 1750))
DEFAULT_VARIANTS = "b0,b3"
DEFAULT_DETECTORS = "mobilenet_v3_large_fpn"
#: The backends each CPU benchmark compares, side by side in one process.
COMPARED = ("torch", "onnxruntime")
_REF = ImageRef("", "", "", "")


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one contender, and how many images each call handled."""

    seconds: list[float]
    images: int

    @property
    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.seconds, 90)) * 1e3

    def row(self) -> str:
        per_image = self.median_ms / self.images
        return (f"{self.median_ms:9.1f} {self.p90_ms:8.1f} {per_image:9.1f} "
                f"{1e3 / per_image:9.1f}")


HEADER = (f"  {'model':<34} {'input':>5} {'batch':>5}  {'backend':<18} {'median ms':>9} "
          f"{'p90 ms':>8} {'ms/image':>9} {'images/s':>9}")


def race(runs: dict[str, Callable[[Any], object]], argument: Any, repeat: int,
         images: int) -> dict[str, Timing]:
    """Time each contender on the same `argument`, `repeat` times in all.

    The runs come in ROUNDS blocks per contender, alternating, so that a burst of load
    from elsewhere is less likely to land on one contender only. Not one run each in
    turn: both backends' thread pools keep spinning for a while after a run, and the
    next contender then shares the cores with them; interleaved run by run, b0 took
    57 ms in torch and 16 ms in ONNX Runtime, in blocks 25 and 9 ms, as each does in a
    process of its own (the node runs one backend). Each block starts with untimed runs
    (WARMUP in the first round, when arenas are allocated; one later) that absorb the
    other contender's spinning.
    """
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(ROUNDS):
        count = repeat // ROUNDS + (round_ < repeat % ROUNDS)
        for name, run in runs.items():
            for _ in range(WARMUP if round_ == 0 else 1):
                run(argument)
            for _ in range(count):
                start = time.perf_counter()
                run(argument)
                seconds[name].append(time.perf_counter() - start)
    return {name: Timing(values, images) for name, values in seconds.items()}


def print_race(model: str, size: int, batch: int, timings: dict[str, Timing],
               note: str = "") -> None:
    """One table row per contender, then the first's time over the second's."""
    for index, (name, timing) in enumerate(timings.items()):
        label = f"{model:<34} {size:>5} {batch:>5}" if index == 0 else " " * 46
        print(f"  {label}  {name:<18} {timing.row()}")
    if len(timings) < 2:
        if note:
            print(f"  {'':<46}  {note}")
        return
    (first, a), (second, b) = list(timings.items())[:2]
    print(f"  {'':<46}  {first} / {second}: {a.median_ms / b.median_ms:.2f}x the time"
          f"{'; ' + note if note else ''}")


# --- inputs ------------------------------------------------------------------------------

def synthetic_study(seed: int = 0) -> list[np.ndarray]:
    """Display images (float32 [0, 1], bone bright) shaped like a limb radiograph.

    Air, a soft-tissue column, two long bones with brighter cortex, one with a dark
    fracture line, a burnt-in side marker and quantum noise: enough edges and texture
    that the detector's proposals and the letterbox resampling do their usual work.
    """
    rng = np.random.default_rng(seed)
    images = []
    for rows, cols in STUDY_SHAPES:
        y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
        image = np.full((rows, cols), 0.05, np.float32)
        centre = cols * rng.uniform(0.45, 0.55)
        tissue = np.abs(x - centre) < cols * 0.3
        image[tissue] = 0.3
        for offset, width in ((-0.1, 0.07), (0.08, 0.05)):
            axis = centre + cols * offset + (y - rows / 2) * rng.uniform(-0.05, 0.05)
            distance = np.abs(x - axis) / (cols * width)
            image = np.where(distance < 1, 0.55 + 0.3 * distance ** 4, image)
        line = np.abs(y - rows * rng.uniform(0.4, 0.6) - (x - centre) * 0.3) < 4
        image[line & (image > 0.5)] = 0.35
        image[40:160, 40:140] = 0.95  # side marker
        image += rng.normal(0.0, 0.02, image.shape).astype(np.float32)
        images.append(np.clip(image, 0.0, 1.0))
    return images


def study_headers(count: int) -> list[Dataset]:
    """What the node reads of a PACS's images beside their pixels: an adult's hand DX,
    body part named, so the intended-use check passes on the header alone."""
    headers = []
    for _ in range(count):
        header = Dataset()
        header.Modality, header.BodyPartExamined, header.PatientAge = "DX", "HAND", "040Y"
        headers.append(header)
    return headers


def model_batch(images: Sequence[np.ndarray], size: int, batch: int,
                bundle: Bundle) -> np.ndarray:
    """The first `batch` study images (cycled) as the pipeline would feed them."""
    boxed = [letterbox(images[i % len(images)], size)[0] for i in range(batch)]
    return to_model_input(boxed, bundle.manifest.mean, bundle.manifest.std)


# --- bundles -----------------------------------------------------------------------------

def build_bundles(variants: list[str], detectors: list[str], work: Path) -> tuple[
        dict[str, Bundle], dict[str, Bundle], dict[tuple[str, str], Bundle]]:
    """Classifier-only bundles per variant, one bundle per detector, and every
    (variant, detector) pair combined into a node bundle for the pipeline.

    Each model is built and exported once: a pair reuses both models' files. The
    detector bundles' own classifier is a throwaway (b0 at 64 px, the cheapest).
    """
    from fractured.training.build import build_untrained_bundle

    classifiers, boxers = {}, {}
    for variant in variants:
        start = time.perf_counter()
        classifiers[variant] = Bundle.load(build_untrained_bundle(
            work / f"classifier-{variant}", variant=variant))
        print(f"  classifier {variant}: built in {time.perf_counter() - start:.1f} s")
    for backbone in detectors:
        start = time.perf_counter()
        boxers[backbone] = Bundle.load(build_untrained_bundle(
            work / f"detector-{backbone}", variant="b0", input_size=64, detector=backbone,
            detector_input_size=DETECTOR_SIZE))
        print(f"  detector {backbone}: built in {time.perf_counter() - start:.1f} s")
    pairs = {(variant, backbone): combine(classifiers[variant], boxers[backbone],
                                          work / f"node-{variant}-{backbone}")
             for variant in variants for backbone in detectors}
    return classifiers, boxers, pairs


def combine(classifier: Bundle, detector: Bundle, out_dir: Path) -> Bundle:
    """A bundle holding one bundle's classifier and another's detector (files and
    manifest sections copied; checksums recomputed by write_bundle)."""
    manifest = replace(classifier.manifest, detector=detector.manifest.detector)
    files = {name: classifier.file(name) for name in (CLASSIFIER_FILE, CLASSIFIER_WEIGHTS)}
    files |= {name: detector.file(name) for name in (DETECTOR_FILE, DETECTOR_WEIGHTS)}
    return write_bundle(out_dir, manifest, files)


def engines(bundle: Bundle, threads: int) -> dict[str, LoadedModels]:
    """The bundle on each backend, torch pinned to the CPU (the GPU has its own section)."""
    return {name: open_models(bundle, name, threads=threads, device="cpu")
            for name in COMPARED}


# --- sections ----------------------------------------------------------------------------

def bench_classifiers(bundles: dict[str, Bundle], study: list[np.ndarray], batches: list[int],
                      threads: int, repeat: int) -> None:
    """Each classifier on both backends per batch size, and how far their outputs are
    apart on these inputs (the build's parity check used random noise, not images)."""
    for bundle in bundles.values():
        spec = bundle.manifest.classifier
        opened = engines(bundle, threads)
        for batch_size in batches:
            batch = model_batch(study, spec.input_size, batch_size, bundle)
            runs = {_label(e): e.classifier.run for e in opened.values()}
            timings = race(runs, batch, repeat, batch_size)
            (logits, cam), (other_logits, other_cam) = (run(batch) for run in runs.values())
            gap = max(np.abs(logits - other_logits).max(), np.abs(cam - other_cam).max())
            scale = max(np.abs(logits).max(), np.abs(cam).max())
            print_race(spec.architecture, spec.input_size, batch_size, timings,
                       f"outputs differ by <= {gap:.1g} (largest |output| {scale:.1g})")


def bench_detectors(bundles: dict[str, Bundle], study: list[np.ndarray], threads: int,
                    repeat: int) -> None:
    """Each detector on both backends, one image per call: the exported graph takes one
    image, and the ONNX Runtime backend loops over a batch, so batch 1 is the rate."""
    for bundle in bundles.values():
        spec = bundle.manifest.detector
        assert spec is not None
        opened = engines(bundle, threads)
        batch = model_batch(study, spec.input_size, 1, bundle)
        runs = {_label(e): e.detector.run for e in opened.values() if e.detector is not None}
        timings = race(runs, batch, repeat, 1)
        # Sorted, because near-tied scores may swap places between backends.
        scores = [np.sort(run(batch)[1][0]) for run in runs.values()]
        print_race(spec.architecture, spec.input_size, 1, timings,
                   f"sorted scores differ by <= {np.abs(scores[0] - scores[1]).max():.1g}")


def bench_pipelines(pairs: dict[tuple[str, str], Bundle], study: list[np.ndarray],
                    threads: int, repeat: int) -> None:
    """What a study costs the node on each backend: the model times plus letterboxing
    full-size images and mapping heatmaps and boxes back to them. Half the repeats (a
    study takes seconds on the CPU); at least 3, so a median means something."""
    images = [(_REF, image) for image in study]
    shape = "/".join(f"{rows}x{cols}" for rows, cols in STUDY_SHAPES)
    print(f"  one study: {len(study)} images of {shape} px, max_batch 8, no TTA")
    for (variant, backbone), bundle in pairs.items():
        pipelines = {name: Pipeline(bundle, name, threads=threads, device="cpu")
                     for name in COMPARED}
        runs = {_label(p.models): p.run for p in pipelines.values()}
        timings = race(runs, images, max(3, repeat // 2), len(study))
        print_race(f"{variant} + {backbone}", bundle.manifest.classifier.input_size,
                   len(study), timings, "times are per study; ms/image is the node's rate")


def bench_memory(pairs: dict[tuple[str, str], Bundle], study: list[np.ndarray], threads: int,
                 work: Path, backends: Sequence[str] = COMPARED) -> None:
    """Peak resident memory of a fresh node process per backend (see `probe_memory`)."""
    study_file = work / "study.npz"
    np.savez(study_file, *study)
    print(f"  {'bundle':<34} {'backend':<12} {'imports':>8} {'+ models':>9} {'+ study':>8}"
          "  torch imported")
    for (variant, backbone), bundle in pairs.items():
        for backend in backends:
            command = [sys.executable, "-m", "bench.engine", "--probe-memory", str(bundle.path),
                       backend, str(study_file), str(threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  cwd=Path(__file__).resolve().parent.parent)
            if done.returncode != 0:
                raise SystemExit(f"memory probe failed ({backend}):\n{done.stderr}")
            peaks = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {variant + ' + ' + backbone:<34} {peaks['backend']:<12} "
                  f"{peaks['imports']:6.0f} MB {peaks['models']:6.0f} MB "
                  f"{peaks['study']:5.0f} MB  {'yes' if peaks['torch'] else 'no'}")
    print("  (peak resident set so far, VmHWM, after each step; MB = 2^20 bytes; the study"
          " step holds the 4 decoded images, 52 MB, as a node does)")


def probe_memory(bundle_path: str, backend: str, study_file: str, threads: int) -> None:
    """Run in a fresh process: load a node's Pipeline, run one study, print peak RSS.

    Only what a node imports has been imported when this runs (this module keeps torch
    out of its top level), so the figures are a node's, interpreter included.
    """
    peaks = {"imports": _peak_mb()}
    pipeline = Pipeline(Bundle.load(bundle_path), backend, threads=threads, device="cpu")
    peaks["models"] = _peak_mb()
    with np.load(study_file) as data:
        study = [data[name] for name in data.files]
    findings = pipeline.run([(_REF, image) for image in study])
    assert len(findings) == len(study)
    peaks["study"] = _peak_mb()
    print(json.dumps({**peaks, "backend": _label(pipeline.models),
                      "torch": "torch" in sys.modules}))


def bench_bundle(bundle: Bundle, peer: Bundle | None, study: list[np.ndarray],
                 batches: list[int], threads: int, repeat: int, work: Path) -> None:
    """A built bundle as the node runs it (the shipped model: trained weights, its own
    input sizes, float16-stored or INT8 ONNX graphs), on ONNX Runtime, the node's CPU
    backend, against a peer in the same process.

    With `peer` (another bundle, e.g. the float32 source of an INT8 one) the two race
    model by model and study by study on ONNX Runtime. Without it, the peer is the
    classifier read back from the graph into torch eager (a shipped bundle carries no
    PyTorch weights; training.weights.read_onnx_resnet is exact at inference), which an
    INT8 graph cannot give; the detector and the study then print alone."""
    import torch

    from fractured.training.export import is_quantized

    spec = bundle.manifest.classifier
    node = open_models(bundle, "onnxruntime", threads=threads)
    label = f"{bundle.manifest.name}-{bundle.manifest.version}"
    other = open_models(peer, "onnxruntime", threads=threads) if peer is not None else None
    peer_label = f"{peer.manifest.name}-{peer.manifest.version}" if peer is not None else ""
    classifier_peers: dict[str, Callable[[Any], Any]] = {}
    note = ""
    if other is not None:
        classifier_peers[f"{peer_label} ORT"] = other.classifier.run
        note = f"logits differ from {peer_label}'s by <= "
    elif not is_quantized(bundle.file(CLASSIFIER_FILE)):
        model, source = torch_classifier(bundle)

        def eager(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with torch.inference_mode():
                logits, cam = model(torch.from_numpy(batch))
                return logits.numpy(), cam.numpy()

        classifier_peers[f"torch (cpu{', read back' if source == CLASSIFIER_FILE else ''})"] = \
            eager
        note = "logits differ from torch's by <= "
    for batch_size in batches:
        batch = model_batch(study, spec.input_size, batch_size, bundle)
        runs = {**classifier_peers, f"{label} ORT": node.classifier.run}
        timings = race(runs, batch, repeat, batch_size)
        gaps = [np.abs(run(batch)[0] - node.classifier.run(batch)[0]).max()
                for run in classifier_peers.values()]
        print_race(f"{label} {spec.architecture}", spec.input_size, batch_size, timings,
                   f"{note}{gaps[0]:.2g}" if gaps else "")
    pair = (spec.architecture, "no detector")
    if node.detector is not None and bundle.manifest.detector is not None:
        boxes = bundle.manifest.detector
        batch = model_batch(study, boxes.input_size, 1, bundle)
        runs = {f"{label} ORT": node.detector.run}
        if other is not None and other.detector is not None:
            runs = {f"{peer_label} ORT": other.detector.run, **runs}
        print_race(f"{bundle.manifest.name} {boxes.architecture}", boxes.input_size, 1,
                   race(runs, batch, repeat, 1))
        pair = (spec.architecture, boxes.architecture)
    images = [(_REF, image) for image in study]
    contenders = {f"{label} ORT": Pipeline(bundle, "onnxruntime", threads=threads)}
    if peer is not None:
        contenders = {f"{peer_label} ORT": Pipeline(peer, "onnxruntime", threads=threads),
                      **contenders}
    headers = study_headers(len(study))
    for step, datasets, note in (
            ("study", headers, "DICOM headers name the body part (HAND), as a PACS sends"),
            ("study, no header", None, "a PNG's case: the region check decides the scope")):
        runs = {name: (lambda argument, p=pipeline, d=datasets: p.run(argument, d))
                for name, pipeline in contenders.items()}
        timings = race(runs, images, max(3, repeat // 2), len(study))
        print_race(f"{label} {step}", spec.input_size, len(study), timings,
                   f"times are per study; ms/image is the node's rate; {note}")
    bench_memory({pair: bundle}, study, threads, work, backends=("onnxruntime",))
    if peer is not None:
        bench_memory({(peer_label, "(peer)"): peer}, study, threads, work,
                     backends=("onnxruntime",))


def torch_classifier(bundle: Bundle) -> tuple[Any, str]:
    """The bundle's classifier as a torch module in eval mode, on the CPU, and the file it
    came from: its torch weights, or for a bundle without them (a float16 bundle) its
    ResNet's weights read back from the graph (training.weights.read_onnx_resnet)."""
    import torch

    from fractured.engine.models import build_classifier
    from fractured.training.weights import load_initial_weights

    spec = bundle.manifest.classifier
    model = build_classifier(spec.variant, len(spec.labels), spec.members)
    if CLASSIFIER_WEIGHTS in bundle.manifest.files:
        model.load_state_dict(torch.load(bundle.file(CLASSIFIER_WEIGHTS), map_location="cpu",
                                         weights_only=True))
        return model.eval(), CLASSIFIER_WEIGHTS
    load_initial_weights(model, str(bundle.file(CLASSIFIER_FILE)), where=str(bundle.path))
    return model.eval(), CLASSIFIER_FILE


def bench_cuda(bundles: dict[str, Bundle], detectors: dict[str, Bundle],
               pairs: dict[tuple[str, str], Bundle], study: list[np.ndarray],
               batches: list[int], threads: int, repeat: int) -> None:
    """The torch backend on the GPU: its FP16 channels-last classifier as it runs (a CUDA
    graph per batch size) against itself eager and against the same weights in FP32
    eager; its FP32 detector against the CPU; the whole pipeline against ONNX Runtime on
    the CPU, with the GPU memory both models and one study take. Each run copies to the
    GPU and back, as the backend does, which also synchronises."""
    import torch

    if not torch.cuda.is_available():
        print("  skipped: torch.cuda.is_available() is False (no CUDA GPU visible to "
              f"torch {torch.__version__})")
        return
    print(f"  {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    print(HEADER)
    for bundle in bundles.values():
        spec = bundle.manifest.classifier
        graphed = open_models(bundle, "torch", device="cuda").classifier
        eager: Any = open_models(bundle, "torch", device="cuda").classifier
        eager.cuda_graphs = False
        model = torch_classifier(bundle)[0].cuda()

        def fp32(batch: np.ndarray, model: Any = model) -> tuple[np.ndarray, np.ndarray]:
            """What the backend's run does, without FP16, channels-last and the graph."""
            with torch.inference_mode():
                logits, cam = model(torch.from_numpy(batch).cuda())
                return logits.cpu().numpy(), cam.cpu().numpy()

        for batch_size in batches:
            batch = model_batch(study, spec.input_size, batch_size, bundle)
            timings = race({"fp16 cl cuda graph": graphed.run, "fp16 cl eager": eager.run,
                            "fp32 eager": fp32}, batch, repeat, batch_size)
            ratio = timings["fp16 cl eager"].median_ms / timings["fp32 eager"].median_ms
            print_race(spec.architecture, spec.input_size, batch_size, timings,
                       f"fp16 eager / fp32 eager: {ratio:.2f}x the time; logits: graph vs "
                       f"eager differ by {_gap(graphed.run(batch), eager.run(batch)):.2g}, "
                       f"fp16 vs fp32 by {_gap(eager.run(batch), fp32(batch)):.2g}")
    for bundle in detectors.values():
        spec = bundle.manifest.detector
        assert spec is not None
        on_gpu = open_models(bundle, "torch", device="cuda").detector
        on_cpu = open_models(bundle, "torch", device="cpu", threads=threads).detector
        assert on_gpu is not None and on_cpu is not None
        batch = model_batch(study, spec.input_size, 1, bundle)

        timings = race({"torch cuda fp32": on_gpu.run, "torch cpu fp32": on_cpu.run}, batch,
                       repeat, 1)
        print_race(spec.architecture, spec.input_size, 1, timings,
                   _box_gap(on_gpu.run(batch), on_cpu.run(batch)))
    for (variant, backbone), bundle in pairs.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        on_gpu_pipeline = Pipeline(bundle, "torch", device="cuda")
        on_cpu_pipeline = Pipeline(bundle, "onnxruntime", threads=threads)
        refs = [(_REF, image) for image in study]
        timings = race({"pipeline torch cuda": on_gpu_pipeline.run,
                        "pipeline ort cpu": on_cpu_pipeline.run}, refs,
                       max(3, repeat // 2), len(study))
        peak = torch.cuda.max_memory_allocated() / 2**20
        reserved = torch.cuda.max_memory_reserved() / 2**20
        print_race(f"{variant} + {backbone}", bundle.manifest.classifier.input_size,
                   len(study), timings,
                   f"GPU memory peak {peak:.0f} MB allocated, {reserved:.0f} MB reserved")


def _gap(found: tuple[np.ndarray, ...], reference: tuple[np.ndarray, ...]) -> float:
    """The largest logit difference between two classifier runs."""
    return float(np.abs(found[0] - reference[0]).max())


def _box_gap(found: Any, reference: Any) -> str:
    """How far one detector run's boxes are from another's: counts and pixels."""
    boxes, scores, _ = found
    ref_boxes, ref_scores, _ = reference
    count, ref_count = int((scores > 0).sum()), int((ref_scores > 0).sum())
    if count != ref_count:
        return f"{count} boxes vs {ref_count}"
    keep = scores > 0
    gap = float(np.abs(boxes[keep] - ref_boxes[ref_scores > 0]).max(initial=0.0))
    return f"{count} boxes, <= {gap:.2g} px apart"


def _label(opened: LoadedModels) -> str:
    """Backend and where it runs, as the tables show it."""
    engine: Any = opened.classifier
    if opened.backend == "torch":
        return f"torch ({engine.device.type})"
    if opened.backend == "onnxruntime":
        return "onnxruntime" + (" (cuda)" if engine.provider.startswith("CUDA") else "")
    return opened.backend


def _peak_mb() -> float:
    """This process's peak resident memory so far, MB.

    VmHWM, the kernel's high-water mark of this process image's resident set, not
    getrusage's ru_maxrss: Linux carries ru_maxrss across fork and exec, so every probe
    started from this (by then ~1.7 GB) benchmark reported the benchmark's own peak.
    ru_maxrss is the fallback where /proc is absent.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kib) / 1024


def _load(*, before: bool = False) -> str:
    """The 1-minute load average; before the run, a warning when other work competes for
    the cores. It matters most to torch: its OpenMP threads meet at a barrier after every
    operator, and with another process keeping one of 2 cores busy, 2-thread torch took
    0.1-2.4 s for a b0 image it runs in ~25 ms alone. At the end
    the figure includes this benchmark's own threads."""
    load = os.getloadavg()[0]
    busy = before and load > 0.5 * (os.cpu_count() or 1)
    return f"{load:.2f}" + (" (other work is running: figures are not an idle machine's)"
                            if busy else "")


def _names(text: str) -> list[str]:
    return [] if text.strip().lower() == "none" else [n.strip() for n in text.split(",")
                                                     if n.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="EfficientNet variants, comma-separated, each at its native size")
    parser.add_argument("--detectors", default=DEFAULT_DETECTORS,
                        help="Faster R-CNN backbones at 512 px, comma-separated, or 'none'")
    parser.add_argument("--threads", type=int, default=2, help="torch and ORT intra-op threads")
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed runs per contender (half as many, at least 3, per study)")
    parser.add_argument("--batch", default="1,4", help="classifier batch sizes")
    parser.add_argument("--bundle", type=Path,
                        help="also a built bundle as the node runs it, e.g. "
                             "engines/fractured-0.8.1 (ONNX Runtime; untrained ones "
                             "skipped with --variants none --detectors none)")
    parser.add_argument("--peer-bundle", type=Path,
                        help="with --bundle: race it against this bundle on ONNX Runtime, "
                             "e.g. an INT8 bundle against its float32 source")
    parser.add_argument("--gpu-only", action="store_true",
                        help="only the CUDA section (the untrained bundles are still built)")
    parser.add_argument("--probe-memory", nargs=4, help=argparse.SUPPRESS,
                        metavar=("BUNDLE", "BACKEND", "STUDY", "THREADS"))
    args = parser.parse_args()
    if args.probe_memory:
        bundle_path, backend, study_file, threads = args.probe_memory
        probe_memory(bundle_path, backend, study_file, int(threads))
        return

    import onnxruntime as ort
    import torch

    from fractured.engine.models import DETECTOR_BACKBONES, INPUT_SIZES

    variants, detectors = _names(args.variants), _names(args.detectors)
    for name in variants:
        if name not in INPUT_SIZES:
            parser.error(f"unknown variant {name!r}; choose from {', '.join(INPUT_SIZES)}")
    for name in detectors:
        if name not in DETECTOR_BACKBONES:
            parser.error(f"unknown detector {name!r}; choose from "
                         f"{', '.join(DETECTOR_BACKBONES)}")
    batches = [int(b) for b in args.batch.split(",")]
    shipped = peer = None
    if args.peer_bundle and not args.bundle:
        parser.error("--peer-bundle races against --bundle: give both")
    try:
        shipped = Bundle.load(args.bundle) if args.bundle else None
        peer = Bundle.load(args.peer_bundle) if args.peer_bundle else None
    except BundleError as exc:
        parser.error(str(exc))
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
          f"{args.repeat} timed runs in {ROUNDS} alternating blocks after "
          f"{WARMUP} warm-up runs")
    print(f"load average (1 min) at start: {_load(before=True)}")
    study = synthetic_study()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        work = Path(scratch)
        classifiers, boxers, pairs = {}, {}, {}
        if variants or detectors:
            print("\nUntrained bundles (BatchNorm calibrated):")
            classifiers, boxers, pairs = build_bundles(variants, detectors, work)
        if (variants or detectors) and not args.gpu_only:
            print("\nModels, CPU (torch eager vs ONNX Runtime, same inputs, same process):")
            print(HEADER)
            bench_classifiers(classifiers, study, batches, args.threads, args.repeat)
            bench_detectors(boxers, study, args.threads, args.repeat)
        if pairs and not args.gpu_only:
            print("\nEnd to end, Pipeline.run (letterbox, classifier, detector, map back):")
            print(HEADER)
            bench_pipelines(pairs, study, args.threads, args.repeat)
            print("\nNode peak memory, classifier + detector loaded, one study run "
                  "(fresh process each):")
            bench_memory(pairs, study, args.threads, work)
        if shipped is not None:
            print(f"\nThe bundle {shipped.path} (trained weights, ONNX Runtime as the node "
                  "runs it):")
            print(HEADER)
            bench_bundle(shipped, peer, study, batches, args.threads, args.repeat, work)
        print("\nCUDA (torch backend: FP16 channels-last classifier as a CUDA graph, eager, and "
              "FP32 eager; FP32 detector; pipeline against ONNX Runtime on the CPU):")
        bench_cuda(classifiers, boxers, pairs, study, batches, args.threads, args.repeat)
    print(f"\nTotal {time.perf_counter() - started:.0f} s; load average (1 min) at the end: "
          f"{_load()}")


if __name__ == "__main__":
    main()
