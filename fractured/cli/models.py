"""The ML staff's commands: look at data, train, evaluate, cross-validate, build, fuse and
quantize engine bundles, run one on image files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fractured import config, log
from fractured.cli.options import (
    CLASSIFIER_VARIANTS,
    DETECTOR_BACKBONES,
    build_errors,
    config_option,
    derived_bundle_options,
    load_settings,
    refuse_existing,
    subset_option,
)
from fractured.cli.reports import print_auc_comparison


@click.command("build-engine")
@click.argument("checkpoints", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--untrained", is_flag=True,
              help="Build a bundle with random weights (for tests and first installs); its "
                   "results are marked UNTRAINED MODEL.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Bundle directory to create (must not exist).")
@click.option("--variant", type=click.Choice(CLASSIFIER_VARIANTS), default="b0",
              show_default=True, help="--untrained: classifier backbone.")
@click.option("--input-size", type=click.IntRange(64, 1024), default=None,
              help="--untrained: model input size in pixels [default: the variant's].")
@click.option("--detector", type=click.Choice(["none", *DETECTOR_BACKBONES]), default="none",
              show_default=True, help="--untrained: Faster R-CNN backbone of a box detector.")
@click.option("--detector-input-size", type=click.IntRange(64, 2048), default=512,
              show_default=True, help="--untrained: detector input size.")
@click.option("--name", help="Bundle name [default: fractured, or fractured-untrained].")
@click.option("--version", "bundle_version",
              help="Bundle version [default: 0.1.0, or 0.0.0 untrained].")
@click.option("--evaluation", type=click.Path(exists=True, path_type=Path),
              help="A `fractured evaluate` report (metrics.json or its folder) of these "
                   "checkpoints: its held-out scores go into the manifest and model card.")
@click.option("--notes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Markdown for the model card: what was tried and its effect.")
@click.option("--float16-weights", is_flag=True,
              help="Store the ONNX weights as float16 (half the size, float32 arithmetic) "
                   "and leave the torch weights out: an ONNX Runtime / TensorRT bundle.")
@click.option("--classifier-bundle", type=click.Path(exists=True, file_okay=False,
                                                     path_type=Path),
              help="Take the classifier of this bundle as it is (files, calibration, "
                   "held-out scores) instead of a classifier checkpoint: a new detector "
                   "beside a classifier already in service.")
@click.option("--detector-bundle", type=click.Path(exists=True, file_okay=False,
                                                   path_type=Path),
              help="Take the detector of this bundle as it is (files, operating points, "
                   "held-out box scores) instead of a detector checkpoint: a new "
                   "classifier beside a detector already in service, trained on the "
                   "same data and split.")
@click.option("--tensorrt/--no-tensorrt", default=None,
              help="Build FP16 TensorRT plans of the graphs, checked against ONNX Runtime "
                   "(needs an NVIDIA GPU and the tensorrt package) [default: where they "
                   "can be built; untrained bundles: no].")
@click.option("--region-check/--no-region-check", default=True, show_default=True,
              help="Fit the intended use's region check, which decides from the image "
                   "what an image without a usable Body Part Examined shows (needs the "
                   "`train` extra's ImageNet EfficientNet-Lite0 weights and the "
                   "classifier's data set).")
def build_engine(checkpoints: tuple[Path, ...], untrained: bool, out_dir: Path, variant: str,
                 input_size: int | None, detector: str, detector_input_size: int,
                 name: str | None, bundle_version: str | None, evaluation: Path | None,
                 notes: Path | None, float16_weights: bool,
                 classifier_bundle: Path | None, detector_bundle: Path | None,
                 tensorrt: bool | None, region_check: bool) -> None:
    """Export trained models to an engine bundle: CHECKPOINTS are best.pt files of a
    classifier (and a detector) or a `fractured train` run directory. Writes manifest.json,
    ONNX graphs checked against PyTorch, their torch weights, MODEL_CARD.md and, on a GPU
    with TensorRT, FP16 plans checked against ONNX Runtime."""
    from fractured.engine.bundle import BundleError
    from fractured.training.build import build_bundle, build_untrained_bundle
    from fractured.training.checkpoint import CheckpointError
    from fractured.training.export import BuildError

    if untrained == bool(checkpoints):
        raise click.UsageError("give either CHECKPOINTS (trained models) or --untrained")
    if untrained and (evaluation or notes or float16_weights or classifier_bundle
                      or detector_bundle):
        raise click.UsageError("--evaluation, --notes, --float16-weights, "
                               "--classifier-bundle and --detector-bundle are for trained "
                               "models")
    log.configure("INFO", "console")
    try:
        if untrained:
            path = build_untrained_bundle(
                out_dir, name=name or "fractured-untrained", version=bundle_version or "0.0.0",
                variant=variant, input_size=input_size,
                detector=None if detector == "none" else detector,
                detector_input_size=detector_input_size, tensorrt=bool(tensorrt))
        else:
            path = build_bundle(checkpoints, out_dir, name=name or "fractured",
                                version=bundle_version or "0.1.0", evaluation=evaluation,
                                notes=notes, float16_weights=float16_weights,
                                classifier_bundle=classifier_bundle,
                                detector_bundle=detector_bundle, tensorrt=tensorrt,
                                region_check=region_check)
    except (BundleError, BuildError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    if untrained:
        click.echo(f"built {path} (UNTRAINED: random weights, results mean nothing)")
    else:
        click.echo(f"built {path}")


@click.command()
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Run directory (settings, split, checkpoints, history).")
@click.option("--config", "train_config", type=click.Path(exists=True, dir_okay=False,
              path_type=Path), help="Training settings TOML (see train.toml); default: "
              "the documented defaults.")
@click.option("--task", type=click.Choice(["classifier", "detector", "both"]), default="both",
              show_default=True, help="Which model(s) to train.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt, "
              "with the settings it was started with (--set and --epochs still apply).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one setting, e.g. --set classifier.lr=3e-4 (repeatable).")
@click.option("--epochs", type=click.IntRange(1), help="Epochs for the model(s) trained.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[run].device.")
@click.option("--limit", type=click.IntRange(1), help="Smoke run: at most N images per split "
              "(the checkpoint is marked limited).")
def train(dataset: Path, out_dir: Path, train_config: Path | None, task: str, resume: bool,
          overrides: tuple[str, ...], epochs: int | None, device: str | None,
          limit: int | None) -> None:
    """Train the classifier and/or the detector on DATASET (ImageFolder, MURA, YOLO, COCO,
    DICOM + CSV, FracAtlas), with a leakage-safe split written to the run directory."""
    log.configure("INFO", "console")
    from fractured.training import config as train_config_module
    from fractured.training import run
    from fractured.training.checkpoint import CheckpointError
    from fractured.training.datasets import DatasetError
    from fractured.training.run import SETTINGS_FILE, RunError

    flags = list(overrides)
    tasks = ("classifier", "detector") if task == "both" else (task,)
    if epochs is not None:
        flags += [f"{name}.epochs={epochs}" for name in tasks]
    if device is not None:
        flags.append(f'run.device="{device}"')
    if limit is not None:
        flags.append(f"data.limit={limit}")
    saved = out_dir / SETTINGS_FILE
    resumed_from_saved = resume and train_config is None and saved.is_file()
    if resumed_from_saved:
        # A resumed run keeps the settings it was started with; --set and --epochs
        # still apply on top (a longer budget, another device).
        train_config = saved
    try:
        settings = train_config_module.load(train_config, flags, saved_run=resumed_from_saved)
        results = run.train(dataset, out_dir, settings, task=task,  # type: ignore[arg-type]
                            resume=resume)
    except (config.ConfigError, DatasetError, RunError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    for name, path in results.items():
        click.echo(f"{name}: {path}")


@click.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Where metrics.json, report.md and the plots go [default: RUN/eval-SPLIT].")
@click.option("--split", "split_name", type=click.Choice(["test", "val", "train"]),
              default="test", show_default=True, help="Which part of the run's split.")
@click.option("--dataset", type=click.Path(exists=True, path_type=Path),
              help="Evaluate on all of another data set instead (external validation).")
@subset_option
@click.option("--bootstrap", type=click.IntRange(0), default=1000, show_default=True,
              help="Bootstrap resamples for the AUC's 95 % interval (0 = none).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
def evaluate(run_dir: Path, out_dir: Path | None, split_name: str, dataset: Path | None,
             subsets: tuple[str, ...], bootstrap: int, device: str) -> None:
    """Score a training run's models on its held-out split: metrics.json, plots, report.md."""
    log.configure("INFO", "console")
    from fractured.training.checkpoint import CheckpointError
    from fractured.training.datasets import DatasetError
    from fractured.training.evaluate import evaluate_run

    target = out_dir or run_dir / f"eval-{'external' if dataset else split_name}"
    try:
        report = evaluate_run(run_dir, target, split_name=split_name, dataset=dataset,
                              subsets=subsets, bootstrap=bootstrap, device=device)
    except (config.ConfigError, DatasetError, CheckpointError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"report: {report}")


@click.command()
@click.argument("runs", nargs=-1, metavar="[RUN ...]",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--merge", "merge", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An earlier `fractured cv` report (its --out) of other folds of the "
                   "same recipe, pooled with the runs; repeatable.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Where cv.json, cv.md and predictions.csv go.")
@click.option("--bootstrap", type=click.IntRange(0), default=1000, show_default=True,
              help="Bootstrap resamples for the AUCs' 95 % intervals (0 = none).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
def cv(runs: tuple[Path, ...], merge: tuple[Path, ...], out_dir: Path, bootstrap: int,
       device: str) -> None:
    """Cross-validation report of the fold runs of one recipe ([data].folds): each run's
    classifier scored on its own validation fold, pooled with the folds of earlier reports
    (--merge); per-fold and pooled out-of-fold AUC."""
    log.configure("INFO", "console")
    from fractured.training.checkpoint import CheckpointError
    from fractured.training.cv import (
        CV_MARKDOWN,
        CrossValidationError,
        cross_validate,
        headline,
    )
    from fractured.training.datasets import DatasetError

    try:
        record = cross_validate(list(runs), out_dir, merge=list(merge), bootstrap=bootstrap,
                                device=device)
    except (config.ConfigError, DatasetError, CheckpointError, CrossValidationError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(headline(record))
    click.echo(f"report: {out_dir / CV_MARKDOWN}")


@click.command("check-dicom")
@click.argument("bundle_dir", metavar="BUNDLE",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--split", "split_dir", required=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The split BUNDLE's classifier was trained with (a run's split/ folder).")
@click.option("--part", type=click.Choice(["val", "test"]), default="test", show_default=True,
              help="Which part's images (no label is read: agreement, not accuracy).")
@click.option("--dataset", type=click.Path(exists=True, path_type=Path),
              help="The data set [default: the one BUNDLE's classifier was trained on].")
@click.option("--limit", type=click.IntRange(1), help="Only the first N images of the part.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Where dicom-check.json and dicom-check.md go.")
def check_dicom(bundle_dir: Path, split_dir: Path, part: str, dataset: Path | None,
                limit: int | None, out_dir: Path) -> None:
    """Each image of a split part written again as 12-bit DICOM (windowed, full range,
    MONOCHROME1, collimated), read back through the node's reader: how far the bundle's
    probability moves from the one it gives the JPEG export."""
    log.configure("INFO", "console")
    from fractured.durable import write_durably
    from fractured.engine.bundle import Bundle, BundleError
    from fractured.engine.pipeline import Pipeline
    from fractured.training import dicom_check
    from fractured.training.bundle_scoring import open_split
    from fractured.training.datasets import DatasetError
    from fractured.training.dicom_check import report_markdown
    from fractured.training.export import BuildError

    try:
        bundle = Bundle.load(bundle_dir)
        samples = open_split(bundle, split_dir, dataset).parts[part][:limit]
    except (BundleError, BuildError, DatasetError, config.ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    label = f"{bundle.manifest.name}-{bundle.manifest.version}"
    result = {"bundle": label, "part": part,
              **dicom_check.check_dicom(Pipeline(bundle, backend="onnxruntime"), samples)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_durably(out_dir / "dicom-check.json",
                  (json.dumps(result, indent=2) + "\n").encode())
    markdown = report_markdown(result, bundle=label, part=part)
    write_durably(out_dir / "dicom-check.md", markdown.encode())
    click.echo(markdown)


@click.command()
@click.argument("members", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Run directory to create: classifier/best.pt, split/, "
              "train.toml.")
@click.option("--detector", type=click.Path(exists=True, path_type=Path),
              help="A finished detector (run directory or detector/best.pt) of the same "
              "split, copied in so that one evaluate and one build-engine cover both.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
def ensemble(members: tuple[Path, ...], out_dir: Path, detector: Path | None,
             device: str) -> None:
    """Average the classifiers of MEMBERS (finished runs of one recipe and split, or a
    ResNet bundle) into one model, calibrated again on their validation split."""
    log.configure("INFO", "console")
    from fractured.training.ensemble import EnsembleError, build_ensemble

    try:
        best = build_ensemble(members, out_dir, detector=detector, device=device)
    except EnsembleError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"classifier: {best}")


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@derived_bundle_options("fitted on its val part, scored on its test part")
@click.option("--notes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Markdown added to the model card's notes.")
def fuse(bundle_dir: Path, split_dir: Path, out_dir: Path, bundle_version: str,
         name: str | None, report_dir: Path, dataset: Path | None, subsets: tuple[str, ...],
         bootstrap: int, dicom_check: Path | None, test_looks: int | None,
         notes: Path | None) -> None:
    """Fuse BUNDLE's detector into its fracture probability: fit a logistic regression of
    the classifier's logit and the best box score on validation, choose the operating
    points again, score the test split against the classifier alone, and write the
    result as a new bundle of the same model files."""
    log.configure("INFO", "console")
    from fractured.training import fusion
    from fractured.training.build import CardRecord, build_fused_bundle

    refuse_existing(out_dir)
    try:
        record = CardRecord.read(dicom_check, test_looks, bundle_dir)
        result = fusion.fuse(bundle_dir, split_dir, report_dir, dataset=dataset,
                             subsets=subsets, bootstrap=bootstrap)
        path = build_fused_bundle(result, out_dir, name=name, version=bundle_version,
                                  notes=notes, record=record)
    except build_errors() as exc:
        raise click.ClickException(str(exc)) from None
    print_auc_comparison(result.summary["auc"], "alone", "fused")
    click.echo(f"report: {report_dir / 'report.md'}")
    click.echo(f"built {path}")


@click.command()
@click.argument("bundle_dir", metavar="BUNDLE",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@derived_bundle_options("calibrated on its train part, checked on its val part, scored on "
                        "its test part")
@click.option("--calibration-images", type=click.IntRange(1), default=128, show_default=True,
              help="Training images whose activations set the INT8 ranges.")
@click.option("--max-auc-drop", type=click.FloatRange(0, 1), default=0.005, show_default=True,
              help="Refuse the INT8 graphs if they lose more validation AUC than this.")
@click.option("--keep-float", "keep_float", metavar="PREFIX", multiple=True,
              help="Leave in float32 the convolutions whose weights' names in the graph "
                   "start with PREFIX (e.g. model.rpn.head, the detector's proposal head); "
                   "repeatable.")
@click.option("--notes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Markdown added to the model card's notes.")
def quantize(bundle_dir: Path, split_dir: Path, out_dir: Path, bundle_version: str,
             name: str | None, report_dir: Path, dataset: Path | None,
             subsets: tuple[str, ...], bootstrap: int, dicom_check: Path | None,
             test_looks: int | None, calibration_images: int, max_auc_drop: float,
             keep_float: tuple[str, ...], notes: Path | None) -> None:
    """Quantize BUNDLE's graphs to INT8 (ONNX Runtime static quantization, calibrated on
    training images), check them against BUNDLE on validation, score them on the test
    split, and write them as a new bundle with BUNDLE's calibration and operating points."""
    import tempfile

    log.configure("INFO", "console")
    from fractured.training import quantize as quantization
    from fractured.training.build import CardRecord, build_quantized_bundle

    refuse_existing(out_dir)
    try:
        record = CardRecord.read(dicom_check, test_looks, bundle_dir)
        with tempfile.TemporaryDirectory(prefix="fractured-quantize-") as scratch:
            result = quantization.quantize(
                bundle_dir, split_dir, report_dir, Path(scratch), dataset=dataset,
                subsets=subsets, bootstrap=bootstrap, calibration_images=calibration_images,
                max_auc_drop=max_auc_drop, keep_float=keep_float)
            path = build_quantized_bundle(result, out_dir, name=name, version=bundle_version,
                                          notes=notes, record=record)
    except build_errors() as exc:
        raise click.ClickException(str(exc)) from None
    print_auc_comparison(result.summary["auc"], "source", "INT8")
    for part, changed in result.summary["changes"].items():
        click.echo(f"{part}: decisions changed {changed['decisions_changed']} of "
                   f"{changed['images']} images; largest probability change "
                   f"{changed['max_probability_change']:.4f}")
    click.echo(f"report: {report_dir / 'report.md'}")
    click.echo(f"built {path}")


@click.command("region-check")
@click.argument("bundle_dir", metavar="BUNDLE",
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Bundle directory to create (must not exist).")
@click.option("--version", "bundle_version", required=True, help="The new bundle's version.")
@click.option("--name", help="The new bundle's name [default: BUNDLE's].")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The classifier checkpoint whose train and val parts the check is "
                   "fitted on [default: the one BUNDLE's manifest names].")
@click.option("--split", "split_dir", type=click.Path(exists=True, file_okay=False,
                                                      path_type=Path),
              help="Instead of the checkpoint (its run gone): the classifier's split "
                   "folder, checked against BUNDLE's record; BUNDLE's own preprocessing "
                   "and data set say the rest.")
@click.option("--float16-weights", is_flag=True,
              help="Store the check's ONNX weights as float16, as build-engine does.")
def region_check(bundle_dir: Path, out_dir: Path, bundle_version: str, name: str | None,
                 checkpoint: Path | None, split_dir: Path | None,
                 float16_weights: bool) -> None:
    """Fit BUNDLE's region check again on its classifier's train and val parts, the
    threshold chosen by cross-validation, and write BUNDLE with it as a new bundle (the
    models unchanged). The old check's held-out figures are dropped: score the new
    bundle (quantize or fuse with a report) to have the new one's."""
    log.configure("INFO", "console")
    from fractured.training.build import build_refitted_region_check

    refuse_existing(out_dir)
    try:
        path, check = build_refitted_region_check(
            bundle_dir, out_dir, name=name, version=bundle_version, checkpoint=checkpoint,
            split=split_dir, float16_weights=float16_weights)
    except build_errors() as exc:
        raise click.ClickException(str(exc)) from None
    scores = check.validation
    click.echo(f"threshold {check.threshold:.1f}: accepts {scores['accepted']:.1%} of "
               f"{scores['images']} images out of fold (folds "
               + ", ".join(f"{share:.1%}" for share in scores["accepted_by_fold"])
               + f"); region right on {scores['region_accuracy']:.1%}")
    click.echo(f"built {path}")


@click.group()
def data() -> None:
    """Look at a training data set before training on it."""


@data.command("inspect")
@click.argument("dataset", type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False),
              required=True, help="Where summary.json and the PNG plots go.")
@click.option("--format", "fmt", help="Data set format (default: detected).")
@click.option("--positive", multiple=True, help="ImageFolder: a positive class folder.")
@click.option("--no-duplicates", is_flag=True, help="Skip the near-duplicate search.")
def data_inspect(dataset: Path, out_dir: Path, fmt: str | None, positive: tuple[str, ...],
                 no_duplicates: bool) -> None:
    """Counts by label and body part, image sizes, box statistics, near-duplicate groups."""
    from fractured.engine.preprocess import DecodeError
    from fractured.training.datasets import DatasetError, open_dataset
    from fractured.training.inspect import inspect_dataset

    try:
        sample_set = open_dataset(dataset, fmt, positive=positive or None)
        result = inspect_dataset(sample_set, out_dir, duplicates=not no_duplicates)
    except (DatasetError, DecodeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(result.table())
    click.echo(f"plots and summary.json in {out_dir}")


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--bundle", "bundle_path", type=click.Path(path_type=Path, file_okay=False),
              help="Engine bundle to run [default: the config's [engine].bundle].")
@config_option
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "torch", "tensorrt"]),
              default="auto", show_default=True, help="Inference backend.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input file and line, instead of a table.")
@click.option("--overlay", "overlay_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Write each readable file's overlay (heatmap, boxes, banner) here as "
                   "<input stem>.png.")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: slower, and reports the probability's spread.")
@click.option("--boxes", type=click.Choice(["likely", "possible", "always"]),
              help="Images whose boxes are shown [default: the config's [engine].boxes].")
@click.pass_context
def predict(ctx: click.Context, files: tuple[Path, ...], bundle_path: Path | None,
            config_path: Path | None, backend: str, as_json: bool, overlay_dir: Path | None,
            tta: bool, boxes: str | None) -> None:
    """Run the engine on DICOM, PNG or JPEG FILES and print what it finds, in input order.

    A file outside the bundle's intended use (a DICOM body part it was not made for, a
    patient under its age) gets no verdict, only the reason. A file that cannot be read
    is reported in its place and the others still run; the exit status is then 1.
    """
    from fractured import predict as prediction
    from fractured.engine.bundle import BundleError
    from fractured.engine.pipeline import Pipeline
    from fractured.engine.registry import resolve_bundle
    from fractured.predict import (
        Prediction,
        Unreadable,
        overlay_paths,
        table_header,
        table_row,
        to_json,
        write_overlay,
    )

    targets: dict[Path, Path] = {}
    if overlay_dir is not None:
        try:
            targets = overlay_paths(files, overlay_dir)
        except ValueError as exc:
            raise click.UsageError(f"--overlay: {exc}") from None
    engine = load_settings(config_path).engine
    bundle_path = bundle_path or engine.bundle
    boxes = boxes or engine.boxes
    try:
        pipeline = Pipeline(resolve_bundle(bundle_path), backend=backend, tta=tta, boxes=boxes,
                            extra_body_parts=engine.extra_body_parts)
    except (BundleError, FileNotFoundError) as exc:
        raise click.ClickException(f"cannot load engine bundle: {exc}") from None
    if not pipeline.model.trained:
        click.echo("UNTRAINED MODEL: these results mean nothing", err=True)
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)

    file_width = max(len(str(path)) for path in files)
    if not as_json:
        click.echo(table_header(file_width))
    failed = 0
    for outcome in prediction.predict(files, pipeline):
        if isinstance(outcome, Unreadable):
            failed += 1
        elif overlay_dir is not None and isinstance(outcome, Prediction):
            write_overlay(outcome, targets[outcome.path])
        click.echo(json.dumps(to_json(outcome)) if as_json else table_row(outcome, file_width))
    if failed:
        click.echo(f"{failed} of {len(files)} files could not be read", err=True)
        ctx.exit(1)


