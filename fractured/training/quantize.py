"""`fractured quantize`: a bundle whose graphs compute in INT8, checked before it is used.

Convolutions are nearly all of both models' time, and a CPU with 8-bit dot-product
instructions runs them several times faster in INT8. ONNX Runtime's static
quantization writes a QDQ graph: every convolution's input and weight pass through a
QuantizeLinear/DequantizeLinear pair, weights per output channel (symmetric int8),
activations per tensor (uint8) with ranges measured on calibration images. It stays a
plain ONNX file: ONNX Runtime fuses each pair into an int8 kernel, and TensorRT builds
an explicitly quantized INT8 plan from it (`training.tensorrt.build_plan`).

The weights use 7 of their 8 bits (`reduce_range`). An x86 CPU without VNNI (SSE,
AVX2, AVX-512 before Cascade Lake) multiplies uint8 by int8 pairwise into a saturating
16-bit sum, which full-range weights can overflow: the same bundle would then compute
other numbers on an older hospital server than on the machine that checked it. With
7-bit weights the sum cannot overflow, so every CPU computes what the check measured.

Only convolutions are quantized: the detector's box-regression layers (Gemm), RoIAlign
and NMS, and the classifier's attention and pooling stay float32, where eight bits would
move boxes and heatmaps most for least time. `keep_float` keeps more convolutions in
float32, named by the prefix of their weights' names in the graph (the exported
parameter names, e.g. `model.rpn.head` for the detector's region-proposal head), so
the part that loses most under eight bits can be measured and left out.

The calibration images come from the training part of the bundle's split, never from
the parts that judge the result. The quantized bundle then runs, as the node runs it,
beside its source on the validation part: a drop in AUC beyond `max_auc_drop` refuses
it. The test part is scored for the held-out record, with the source beside it (AUC
of both and the paired interval of their difference, decisions changed at each
operating point, the largest change of probability and box score, and both detectors'
AP and FROC against the true boxes), so ML staff can judge the roll-out. The
classifier's calibration, fusion and operating points are the source's: they were
fitted on validation and quantization must not move them, which is what the check
measures.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    DETECTOR_FILE,
    Bundle,
    Manifest,
    write_bundle,
)
from fractured.engine.exposed_field import field_for
from fractured.engine.pipeline import Pipeline
from fractured.engine.preprocess import DecodeError, letterbox, to_model_input
from fractured.engine.region_check import REGION_CHECK_FILE
from fractured.engine.sources import load_image
from fractured.training.bundle_scoring import (
    PREDICTIONS_FILE,
    VALIDATION_FILE,
    Measured,
    Reference,
    changes,
    detection_scores,
    masks_for,
    measure,
    open_split,
    write_rows,
    write_test_report,
)
from fractured.training.datasets.base import Sample
from fractured.training.evaluation import paired_auc_difference
from fractured.training.export import BuildError, float32_graph, is_quantized
from fractured.training.node_assessment import NodeView, check_fitted_on_val

log = structlog.get_logger()

#: Training images whose activations set the int8 ranges (a few minutes on 2 cores).
CALIBRATION_IMAGES = 128
#: The largest validation AUC a quantized bundle may lose against its source.
MAX_AUC_DROP = 0.005
#: Orders the calibration images (a fixed draw from the training part).
CALIBRATION_SEED = 0


@dataclass(frozen=True)
class QuantizationResult:
    """The quantized graphs (in a scratch folder) and the records the new bundle keeps."""

    source: Bundle
    files: dict[str, Path]  # classifier.onnx, detector.onnx: the INT8 graphs
    summary: dict[str, Any]  # training.quantization of the new manifest
    report: dict[str, Any]  # the metrics.json written
    report_path: Path


def quantize(source: Path, split_dir: Path, report_dir: Path, scratch: Path, *,
             dataset: Path | None = None, subsets: Sequence[str] = (),
             bootstrap: int = 1000, calibration_images: int = CALIBRATION_IMAGES,
             max_auc_drop: float = MAX_AUC_DROP,
             keep_float: Sequence[str] = ()) -> QuantizationResult:
    """Quantize bundle `source`'s graphs into `scratch`, check them on the validation part
    of `split_dir` and score them on its test part (report in `report_dir`).
    Convolutions whose weights' names start with a prefix in `keep_float` stay float32."""
    from onnxruntime import __version__ as onnxruntime_version

    bundle = Bundle.load(source)
    manifest = bundle.manifest
    label = f"{manifest.name}-{manifest.version}"
    if not manifest.trained:
        raise BuildError(f"{source}: an untrained bundle has nothing worth quantizing")
    if any(is_quantized(bundle.file(name)) for name in (CLASSIFIER_FILE, DETECTOR_FILE)
           if name in manifest.files):
        raise BuildError(f"{source}: already quantized; quantize the bundle it was made from")
    if calibration_images < 1:
        raise ValueError(f"calibration_images must be at least 1, got {calibration_images}")
    split = open_split(bundle, split_dir, dataset, subsets)
    chosen = _calibration_samples(split.parts["train"], calibration_images)

    graphs: dict[str, tuple[str, int, str]] = {
        CLASSIFIER_FILE: ("classifier", manifest.classifier.input_size, manifest.crop)}
    if manifest.detector is not None:
        graphs[DETECTOR_FILE] = ("detector", manifest.detector.input_size,
                                 manifest.detector_crop)
    kept = {name: kept_float(bundle.file(name), keep_float) for name in graphs}
    unmatched = [prefix for prefix in keep_float
                 if not any(kept[name][prefix] for name in graphs)]
    if unmatched:  # before minutes of calibration, not after
        raise BuildError(f"--keep-float {', '.join(unmatched)}: no convolution's weights "
                         f"are named so in {source}")
    files: dict[str, Path] = {}
    for name, (kind, size, crop) in graphs.items():
        log.info("quantize.step", step=f"quantize the {kind}", calibration_images=len(chosen))
        files[name] = scratch / name
        quantize_graph(bundle.file(name), files[name], scratch,
                       _calibration_batches(chosen, size, crop, manifest),
                       [node for nodes in kept[name].values() for node in nodes])

    staged = _staged_bundle(bundle, files, scratch / "staged")
    pipelines = {"source": Pipeline(bundle, backend="onnxruntime", boxes="always"),
                 "int8": Pipeline(staged, backend="onnxruntime", boxes="always")}
    spec = manifest.classifier

    def probability(measured: Measured) -> np.ndarray:
        return spec.probability(measured.evidence[:, 0], measured.evidence[:, 1])

    def boxes(runs: dict[str, Measured]) -> dict[str, dict[str, Any]]:
        """Both detectors' AP and FROC against the part's true boxes (none without one)."""
        return ({name: detection_scores(measured, manifest.detector)
                 for name, measured in runs.items()} if manifest.detector is not None else {})

    val = measure(pipelines, split.parts["val"], desc="validation")
    val_auc = paired_auc_difference(val["int8"].labels, probability(val["source"]),
                                    probability(val["int8"]), bootstrap=0)
    # the detector's loss is recorded on validation too, where choices between ways of
    # quantizing (calibration images, what stays float) can be made without the test part
    val_detection = boxes(val)
    log.info("quantize.checked", auc_source=val_auc["before"], auc_int8=val_auc["after"],
             **{f"{key}_{name}": scores[key] for name, scores in val_detection.items()
                for key in ("ap50", "froc_score")})
    check_auc_drop(val_auc, max_auc_drop)
    test = measure(pipelines, split.parts["test"], desc="test")
    detection = boxes(test)

    report_dir.mkdir(parents=True, exist_ok=True)
    parts = {"validation": val, "test": test}
    before = {part: probability(runs["source"]) for part, runs in parts.items()}
    after = {part: probability(runs["int8"]) for part, runs in parts.items()}
    write_rows(report_dir / VALIDATION_FILE, val["int8"],
               {"source_probability": before["validation"], "probability": after["validation"]})
    write_rows(report_dir / PREDICTIONS_FILE, test["int8"],
               {"source_probability": before["test"], "probability": after["test"]})
    y = test["int8"].labels
    comparison = {
        "validation": val_auc,
        "test": paired_auc_difference(y, before["test"], after["test"], bootstrap=bootstrap),
        **{f"test, {name}": paired_auc_difference(y[mask], before["test"][mask],
                                                  after["test"][mask], bootstrap=bootstrap)
           for name, mask in masks_for(test["int8"], subsets).items()
           if not name.startswith("body_part")},
    }
    points = {"high_sensitivity": spec.operating_points.high_sensitivity,
              "high_specificity": spec.operating_points.high_specificity}
    summary = {
        "source": label,
        "method": ("ONNX Runtime static quantization, QDQ: convolutions only, weights int8 "
                   "with a 7-bit range per output channel, activations uint8 per tensor "
                   "(min-max ranges)"),
        "onnxruntime": onnxruntime_version,
        "models": [kind for kind, _, _ in graphs.values()],
        "kept_float": {prefix: sum(len(kept[name][prefix]) for name in graphs)
                       for prefix in keep_float},
        "calibration": {"split": "train", "split_source": str(split_dir),
                        "images": len(chosen), "seed": CALIBRATION_SEED},
        "max_auc_drop": max_auc_drop,
        "auc": comparison,
        "changes": {part: changes(runs["source"], runs["int8"], before[part], after[part],
                                   spec.points_for)
                    for part, runs in parts.items()},
        "detection": _detection_summary(detection),
        "detection_validation": _detection_summary(val_detection),
        "report": str(report_dir / "metrics.json"),
    }
    report = write_test_report(
        report_dir, title=f"INT8 quantization of {label} on its test split", split=split,
        test=test["int8"], probability=after["test"],
        reference=Reference(f"{label} (float32 arithmetic)", before["test"]), points=points,
        temperature=spec.temperature,
        formula=("probability as in the source bundle: " + (
            f"{spec.fusion.formula()}" if spec.fusion else "sigmoid(logit / T)")),
        subsets=subsets, bootstrap=bootstrap,
        sections={"quantization": summary,
                  **({"detection": detection["int8"]} if detection else {})},
        model={"bundle": str(source), "quantized": ", ".join(summary["models"]),
               "backend": "onnxruntime"},
        data={"calibrated_on": f"{len(chosen)} images of its train split"},
        node=NodeView(val["int8"], after["validation"], spec.points_for,
                      check_fitted_on_val=check_fitted_on_val(manifest)))
    log.info("quantize.scored", report=str(report_dir / "report.md"),
             test_auc_source=comparison["test"]["before"],
             test_auc_int8=comparison["test"]["after"])
    return QuantizationResult(source=bundle, files=files, summary=summary, report=report,
                              report_path=report_dir / "metrics.json")


def _detection_summary(scores: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: {key: part.get(key) for key in (
        "images", "gt_boxes", "ap50", "ap50_95", "froc_score", "lesion_sensitivity")}
        for name, part in scores.items()}


def check_auc_drop(validation: dict[str, Any], max_auc_drop: float) -> None:
    """BuildError when the INT8 graphs lost more validation AUC than `max_auc_drop`
    (`validation` is `paired_auc_difference`'s, source before, INT8 after)."""
    difference = validation["difference"]
    if difference is not None and difference < -max_auc_drop:
        raise BuildError(f"the INT8 graphs lose {-difference:.4f} of validation AUC "
                         f"({validation['before']:.4f} -> {validation['after']:.4f}), more "
                         f"than the {max_auc_drop:g} allowed; not quantized")


def _calibration_samples(train: Sequence[Sample], count: int) -> list[Sample]:
    """A fixed draw of `count` training images (all of them where there are fewer)."""
    order = np.random.default_rng(CALIBRATION_SEED).permutation(len(train))
    return [train[i] for i in order[:count]]


def _calibration_batches(samples: Sequence[Sample], size: int, crop: str,
                         manifest: Manifest) -> Iterator[np.ndarray]:
    """Each readable calibration image as the model sees it (cropped as it was trained,
    letterboxed, normalised as the bundle says)."""
    for sample in samples:
        try:
            image = load_image(sample.path)
        except DecodeError:
            continue  # listed where the split's images are scored; nothing to calibrate on
        field = field_for(crop, image.pixels, image.dataset)
        yield to_model_input([letterbox(image.pixels, size, field)[0]], manifest.mean,
                             manifest.std)


def kept_float(graph_path: Path, prefixes: Sequence[str]) -> dict[str, list[str]]:
    """The names of the convolutions in the ONNX graph at `graph_path` whose weights'
    names start with each prefix (the exported parameter names, e.g. `model.rpn.head`)."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    return {prefix: [node.name for node in graph.node
                     if node.op_type == "Conv" and node.input[1].startswith(prefix)]
            for prefix in prefixes}


def quantize_graph(source: Path, target: Path, scratch: Path,
                   batches: Iterator[np.ndarray], float_nodes: Sequence[str] = ()) -> None:
    """Write the QDQ INT8 form of the ONNX graph at `source` to `target`, the convolution
    nodes named in `float_nodes` left in float32."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    plain = scratch / f"{source.stem}.float32.onnx"
    float32_graph(source, plain)  # float16-stored weights hide the convolutions' weights
    input_name = onnx.load(str(plain), load_external_data=False).graph.input[0].name

    class Images(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {input_name: batch}

    root = logging.getLogger()
    level = root.level
    # the quantizer logs a line per tensor, and advises pre-processing (shape inference
    # and graph optimisation) that our exported graphs have had already
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_static(str(plain), str(target), Images(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        op_types_to_quantize=["Conv"],
                        nodes_to_exclude=list(float_nodes))
    finally:
        root.setLevel(level)
    plain.unlink()


def carried_files(source: Bundle) -> dict[str, Path]:
    """The source's files an INT8 bundle keeps as they are: the region check, whose
    threshold was measured on its float graph (INT8 would move the distances it is
    compared with), and which runs only on images without a usable header."""
    return {name: source.file(name) for name in (REGION_CHECK_FILE,)
            if name in source.manifest.files}


def _staged_bundle(source: Bundle, files: dict[str, Path], where: Path) -> Bundle:
    """The quantized graphs as a bundle the pipeline can run, for the checks only (with
    the source's region check, which stays float: see `carried_files`)."""
    files = {**carried_files(source), **files}
    manifest = replace(source.manifest, backends=("onnxruntime",),
                       # its log lines say which is which
                       version=f"{source.manifest.version}+int8-check")
    if where.exists():
        shutil.rmtree(where)
    return write_bundle(where, manifest, files)
