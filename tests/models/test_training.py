"""`fractured train`: settings, loss, augmentation, checkpoints, initial weights, and a
smoke run through the CLI (train, resume, evaluate) on a synthetic YOLO data set."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import shutil
import tomllib
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fractured.cli import main
from fractured.config import ConfigError
from fractured.engine.bundle import (
    CLASSIFIER_FILE,
    CLASSIFIER_WEIGHTS,
    DETECTOR_FILE,
    DETECTOR_WEIGHTS,
    Bundle,
)
from fractured.engine.models import FractureClassifier, FractureDetector
from fractured.engine.preprocess import to_model_input
from fractured.training import checkpoint, config
from fractured.training.config import AugmentSettings
from fractured.training.data import letterbox_samples
from fractured.training.datasets.base import BoxLabel, Sample
from fractured.training.export import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    export_classifier,
    store_weights_as_float16,
)
from fractured.training.loops import Device, train_classifier_epoch, train_detector_epoch
from fractured.training.losses import FractureLoss
from fractured.training.schedule import (
    BestTracker,
    extend_schedule,
    hold_batchnorm,
    lr_schedule,
    optimiser,
    step_schedule,
)
from fractured.training.splits import read_written
from fractured.training.transforms import as_box_target, train_transform
from fractured.training.weights import load_initial_weights, restore_batchnorm
from tests.paths import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- settings ------------------------------------------------------------------------------



def test_shipped_train_toml_documents_every_key_with_its_default() -> None:
    """The example file and the code agree: every key is present, at its default."""
    text = (REPO / "train.toml").read_text()
    parsed = tomllib.loads(text)
    defaults = dataclasses.asdict(config.load(None))
    assert {section: set(values) for section, values in parsed.items()} == \
        {section: set(values) for section, values in defaults.items()}
    assert config.load(REPO / "train.toml") == config.load(None)


def test_defaults_load_and_round_trip(tmp_path: Path) -> None:
    settings = config.load(None)
    assert settings.classifier.variant == "b0" and settings.detector.input_size == 512
    config.save(settings, tmp_path / "train.toml")
    assert config.load(tmp_path / "train.toml") == settings


def test_overrides_parse_as_toml_values(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text('[classifier]\nvariant = "b2"\nlr = 0.01\n')
    settings = config.load(path, ["classifier.lr=3e-4", "augment.hflip=false",
                                  "data.positive=[\"fractured\"]", "classifier.schedule=step"])
    assert settings.classifier.variant == "b2"  # from the file
    assert settings.classifier.lr == 3e-4  # the flag wins
    assert settings.augment.hflip is False
    assert settings.data.positive == ["fractured"]
    assert settings.classifier.schedule == "step"  # a bare word is a string


@pytest.mark.parametrize(("text", "flags", "message"), [
    ("[clasifier]\nlr = 1\n", [], r"\[clasifier\]: unknown section"),
    ("[classifier]\nlearning_rate = 1\n", [], r"\[classifier\]\.learning_rate"),
    ("[classifier]\nepochs = \"ten\"\n", [], r"\[classifier\]\.epochs"),
    ("[classifier]\nvariant = \"b9\"\n", [], r"\[classifier\]\.variant"),
    ("", ["classifier.freeze_epochs=2"], r"frozen warm-up needs \[classifier\]\.initial_w"),
    ("", ["data.val=0.6", "data.test=0.5"], r"must leave images to train on"),
    ("", ["detector.input_size=16"], r"\[detector\]\.input_size: at least 32"),
    ("", ["classifier.target_sensitivity=1.0"], r"\[classifier\]\.target_sensitivity"),
    ("", ["data.crop=collimator"], r"\[data\]\.crop"),
    ("", ["classifier.lr"], r"expected section\.key=value"),
    ("[classifier\n", [], r"not valid TOML"),
])
def test_bad_settings_name_the_key(tmp_path: Path, text: str, flags: list[str],
                                   message: str) -> None:
    path = tmp_path / "train.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config.load(path, flags)


# -- loss ------------------------------------------------------------------------------------

def test_loss_is_bce_plus_weighted_focal() -> None:
    logits = torch.tensor([2.0, -1.0, 0.3, -3.0])
    targets = torch.tensor([1.0, 1.0, 0.0, 0.0])
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.where(targets == 1, torch.sigmoid(logits), 1 - torch.sigmoid(logits))
    focal = (1 - p_true) ** 2 * bce
    assert torch.isclose(FractureLoss(focal_weight=0.0)(logits, targets), bce.mean())
    assert torch.isclose(FractureLoss(focal_weight=0.5, gamma=2.0)(logits, targets),
                         (bce + 0.5 * focal).mean())
    weight = torch.where(targets == 1, 4.0, 1.0)
    assert torch.isclose(FractureLoss(focal_weight=0.0, pos_weight=4.0)(logits, targets),
                         (weight * bce).mean())


def test_focal_term_spares_easy_images() -> None:
    loss = FractureLoss(focal_weight=1.0, gamma=2.0)
    easy, hard = torch.tensor([6.0]), torch.tensor([-1.0])
    one = torch.tensor([1.0])
    # the focal term adds almost nothing to a confident right answer, a lot to a wrong one
    assert loss(easy, one) / F.binary_cross_entropy_with_logits(easy, one) < 1.001
    assert loss(hard, one) / F.binary_cross_entropy_with_logits(hard, one) > 1.5
    with pytest.raises(ValueError, match="pos_weight"):
        FractureLoss(pos_weight=0.0)


# -- training loop ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_training_epoch_learns_a_visible_marker() -> None:
    """The loop really trains: repeated epochs on a tiny set where fracture images carry
    a bright square bring the loss well below where it started."""
    torch.manual_seed(0)
    images = torch.rand(16, 3, 32, 32) * 0.2
    labels = torch.tensor([1.0, 0.0] * 8)
    images[labels == 1, :, 8:20, 8:20] = 3.0
    model = FractureClassifier(variant="b0", num_labels=1)
    settings = config.load(None, ["classifier.lr=3e-3"]).classifier
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=True)
    optimizer = optimiser(model.parameters(), settings)
    device = Device.choose("cpu", amp=False, channels_last=False)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    losses = [train_classifier_epoch(model, loader, FractureLoss(), optimizer, scaler, device,
                                     desc="test") for _ in range(12)]
    assert all(np.isfinite(losses))
    assert min(losses[-3:]) < 0.5 * losses[0], losses


# -- schedules and early stopping ---------------------------------------------------------------

def lrs(schedule_name: str, scores: list[float], **extra: object) -> list[float]:
    cfg = dataclasses.replace(config.load(None).classifier, schedule=schedule_name, epochs=4,
                              lr=1.0, **extra)
    optimizer = optimiser([torch.nn.Parameter(torch.zeros(1))], cfg)
    schedule = lr_schedule(optimizer, cfg)
    seen = []
    for score in scores:
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_schedule(schedule, score)
    return seen


def test_schedules_follow_their_settings() -> None:
    cosine = lrs("cosine", [0.5] * 4)
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx(0.5) and cosine == sorted(cosine)[::-1]
    assert lrs("step", [0.5] * 4, step_size=2, gamma=0.1) == pytest.approx([1, 1, 0.1, 0.1])
    # plateau: the score stops improving after epoch 0; patience 1 -> halved after 2 stale
    assert lrs("plateau", [0.6, 0.6, 0.6, 0.6], plateau_patience=1,
               plateau_factor=0.5) == pytest.approx([1, 1, 1, 0.5])


def test_a_resumed_cosine_schedule_ends_at_the_new_budget() -> None:
    cfg = dataclasses.replace(config.load(None).classifier, epochs=4, lr=1.0)
    optimizer = optimiser([torch.nn.Parameter(torch.zeros(1))], cfg)
    schedule = lr_schedule(optimizer, cfg)
    for _ in range(2):
        optimizer.step()
        step_schedule(schedule, 0.0)
    extend_schedule(schedule, 8)
    for _ in range(6):
        assert optimizer.param_groups[0]["lr"] > 0
        optimizer.step()
        step_schedule(schedule, 0.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_early_stopping_after_patience_epochs_without_a_better_score() -> None:
    tracker = BestTracker(patience=2)
    improved = [tracker.record({"epoch": epoch}, score)
                for epoch, score in enumerate([0.5, 0.7, 0.6, 0.7])]
    assert improved == [True, True, False, False]  # a tie is not an improvement
    assert tracker.should_stop and tracker.best_epoch == 1
    restored = BestTracker(patience=2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.should_stop and len(restored.history) == 4
    assert not BestTracker(patience=0).should_stop


# -- augmentation ----------------------------------------------------------------------------

def test_boxes_move_with_their_pixels() -> None:
    """Whatever flip, rotation and zoom are drawn, the bright square stays inside its box."""
    transform = train_transform(AugmentSettings(rotation=15, zoom=0.2, vflip=True,
                                                brightness=0, contrast=0), boxes=True)
    grey = torch.zeros(1, 64, 64)
    grey[:, 10:20, 30:50] = 1.0
    torch.manual_seed(1)
    for _ in range(30):
        from torchvision import tv_tensors

        image, target = transform(tv_tensors.Image(grey.clone()),
                                  as_box_target(torch.tensor([[30.0, 10.0, 50.0, 20.0]]),
                                                torch.ones(1, dtype=torch.int64), 64))
        bright = (image[0] > 0.5).nonzero()
        if len(bright) == 0:  # zoomed out of the canvas: the box must be gone too
            assert len(target["boxes"]) == 0
            continue
        x0, y0, x1, y1 = target["boxes"][0].tolist()
        assert x0 - 1 <= bright[:, 1].min() and bright[:, 1].max() <= x1 + 1
        assert y0 - 1 <= bright[:, 0].min() and bright[:, 0].max() <= y1 + 1


def test_unreadable_images_are_left_out_and_listed(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "good.png"), np.full((40, 80), 200, np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    samples = [Sample(tmp_path / "good.png", 1, "hand", boxes=(BoxLabel(0, 0, 0.5, 1),)),
               Sample(tmp_path / "broken.jpg", 0, "hand", boxes=())]
    result = letterbox_samples(samples, 32)
    assert [sample.path.name for sample in result.samples] == ["good.png"]
    assert result.images.shape == (1, 32, 32)
    assert len(result.unreadable) == 1 and result.unreadable[0][0].endswith("broken.jpg")


# -- checkpoints and initial weights ----------------------------------------------------------

def test_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "best.pt"
    checkpoint.save(path, {"kind": "classifier", "epoch": 3, "model": {"w": torch.ones(2)}})
    assert checkpoint.load(path, "classifier")["epoch"] == 3
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(checkpoint.CheckpointError, match="a classifier checkpoint, expected"):
        checkpoint.load(path, "detector")
    (tmp_path / "foreign.pt").write_bytes(b"not torch")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(checkpoint.CheckpointError, match="not a fractured checkpoint"):
        checkpoint.load(tmp_path / "plain.pt")


def test_initial_weights_from_a_local_file(tmp_path: Path) -> None:
    source = FractureClassifier(variant="b0", num_labels=1)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    target = FractureClassifier(variant="b0", num_labels=1)
    taken = load_initial_weights(target, str(tmp_path / "w.pt"), where="[classifier].x")
    assert taken == len(source.state_dict())
    first = next(iter(source.state_dict()))
    assert torch.equal(target.state_dict()[first], source.state_dict()[first])
    torch.save({"unrelated.weight": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match=r"\[classifier\]\.x: .*other\.pt has no tensor"):
        load_initial_weights(target, str(tmp_path / "other.pt"), where="[classifier].x")
    with pytest.raises(ConfigError, match="neither a file nor a torchvision weights name"):
        load_initial_weights(target, str(tmp_path / "missing.pt"), where="[classifier].x")
    with pytest.raises(ConfigError, match="is not a torchvision weights name"):
        load_initial_weights(target, "EfficientNet_B0_Weights.NOPE", where="[classifier].x")


def test_a_resnet_classifier_checkpoint_starts_a_resnet_fpn_detector(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = FractureClassifier(variant="resnet18", num_labels=1)
    checkpoint.save(tmp_path / "best.pt", {"kind": "classifier",
                                           "model": classifier.state_dict()})
    detector = FractureDetector("resnet18_fpn", input_size=64)
    taken = load_initial_weights(detector.model, str(tmp_path / "best.pt"),
                                 where="[detector].initial_weights")
    body = detector.model.backbone.body
    # every ResNet layer is taken (BatchNorm statistics included), nothing else is
    assert taken == len(body.state_dict())
    assert torch.equal(body.conv1.weight, classifier.features[0].weight)
    assert torch.equal(body.bn1.running_var, classifier.features[1].running_var)
    assert torch.equal(body.layer4[1].conv2.weight, classifier.features[7][1].conv2.weight)
    # an EfficientNet classifier has no layer a ResNet-FPN detector can take
    checkpoint.save(tmp_path / "b0.pt", {"kind": "classifier",
                                         "model": FractureClassifier("b0").state_dict()})
    with pytest.raises(ConfigError, match="has no tensor matching"):
        load_initial_weights(detector.model, str(tmp_path / "b0.pt"), where="[detector].x")


def _classifier_with_real_statistics(variant: str) -> FractureClassifier:
    """A random classifier whose BatchNorm layers have non-trivial statistics and affine,
    so folding them into the convolutions changes every weight."""
    torch.manual_seed(0)
    model = FractureClassifier(variant=variant)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
            assert module.running_var.shape == (channels,)
    return model.eval()


@pytest.mark.parametrize("float16", [False, True], ids=["float32", "float16-stored"])
def test_a_bundles_resnet_onnx_gives_back_an_equivalent_classifier(tmp_path: Path,
                                                                   float16: bool) -> None:
    source = _classifier_with_real_statistics("resnet18")
    path = tmp_path / "classifier.onnx"
    export_classifier(source, path, 64)
    if float16:
        store_weights_as_float16(path)
    recovered = FractureClassifier(variant="resnet18")
    taken = load_initial_weights(recovered, str(path), where="[detector].initial_weights")
    # every tensor but the BatchNorm batch counters
    assert taken == sum(1 for key in recovered.state_dict() if "num_batches" not in key)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = source(image), recovered.eval()(image)
    tolerance = 2e-2 if float16 else 1e-4
    for expected, actual in zip(want, got, strict=True):
        assert torch.allclose(expected, actual, atol=tolerance), (expected - actual).abs().max()
    # and it fills a ResNet-FPN detector's body, as a checkpoint does
    detector = FractureDetector("resnet18_fpn", input_size=64)
    assert load_initial_weights(detector.model, str(path), where="x") == sum(
        1 for key in detector.model.backbone.body.state_dict() if "num_batches" not in key)


def test_restored_batchnorm_keeps_inference_and_lets_training_mode_match_it(
        tmp_path: Path) -> None:
    source = _classifier_with_real_statistics("resnet18")
    path = tmp_path / "classifier.onnx"
    export_classifier(source, path, 64)
    recovered = FractureClassifier(variant="resnet18")
    load_initial_weights(recovered, str(path), where="[classifier].initial_weights")
    torch.manual_seed(1)
    images = [torch.rand(8, 3, 64, 64) * 2 - 1 for _ in range(4)]
    probe = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want = recovered.eval()(probe)[0]
        # (a copy: a training-mode pass moves the running statistics)
        folded_in_training = copy.deepcopy(recovered).train()(probe)[0]
    assert restore_batchnorm(recovered, images) == 20  # every ResNet18 BatchNorm
    with torch.no_grad():
        kept = recovered.eval()(probe)[0]
        in_training = recovered.train()(probe)[0]
    assert torch.allclose(kept, want, atol=1e-4), (kept - want).abs().max()
    # training mode computes about what inference does, where the folded form did not
    restored_error = (in_training - want).abs().max()
    assert restored_error < 0.1 * (folded_in_training - want).abs().max(), restored_error
    assert restore_batchnorm(recovered, images) == 0  # nothing folded is left
    # a freshly built model has no folded BatchNorm: nothing is measured
    assert restore_batchnorm(FractureClassifier(variant="resnet18"), []) == 0


def test_an_onnx_file_that_is_no_resnet_classifier_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "b0.onnx"
    export_classifier(FractureClassifier(variant="b0"), path, 64)
    with pytest.raises(ConfigError, match="has no tensor matching"):
        load_initial_weights(FractureDetector("resnet18_fpn", input_size=64).model,
                             str(path), where="[detector].initial_weights")
    (tmp_path / "broken.onnx").write_bytes(b"not a protobuf")
    with pytest.raises(ConfigError, match="not a readable ONNX file"):
        load_initial_weights(FractureClassifier("resnet18"), str(tmp_path / "broken.onnx"),
                             where="[detector].initial_weights")


def test_held_batchnorm_keeps_its_statistics_while_the_detector_trains() -> None:
    torch.manual_seed(0)
    detector = FractureDetector("resnet18_fpn", input_size=64)
    body = detector.model.backbone.body
    held = hold_batchnorm(body)
    assert len(held) == 20  # ResNet18: bn1, two per block, three downsample
    before = {key: value.clone() for key, value in body.state_dict().items()}
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    optimizer = torch.optim.SGD([p for p in detector.parameters() if p.requires_grad], lr=0.1)
    cpu = Device.choose("cpu", amp=False, channels_last=False)
    train_detector_epoch(detector, [(images, targets)], optimizer,
                         torch.amp.GradScaler("cuda", enabled=False), cpu, desc="test", held=held)
    after = body.state_dict()
    norms = [key for key in before if key.startswith("bn1.") or ".bn" in key
             or ".downsample.1." in key]
    assert norms and all(torch.equal(before[key], after[key]) for key in norms)
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])  # convs learn


# -- a smoke run through the CLI ----------------------------------------------------------------

SMOKE_FLAGS = ["--set", "classifier.input_size=32", "--set", "classifier.batch_size=8",
               "--set", "detector.input_size=96", "--set", "detector.batch_size=4",
               "--set", "run.workers=0", "--set", "data.val=0.25", "--set", "data.test=0.25"]


def synthetic_yolo(root: Path, n: int = 32) -> Path:
    """A flat YOLO data set: smooth random 'anatomy', and on every other image a bright
    'fracture' rectangle with its box. Distinct seeds keep near-duplicates apart."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("fracture\n")
    (root / "NOTICE.txt").write_text("Synthetic images made by the fractured test suite.\n")
    for index in range(n):
        rng = np.random.default_rng(index)
        rows, cols = 120 + 8 * (index % 3), 100
        noise = cv2.GaussianBlur(rng.random((rows, cols)).astype(np.float32), (0, 0), 8)
        picture = (200 * (noise - noise.min()) / np.ptp(noise)).astype(np.uint8)
        label = ""
        if index % 2:
            x, y = int(rng.integers(10, 60)), int(rng.integers(10, 70))
            picture[y:y + 30, x:x + 25] = 255
            label = f"0 {(x + 12.5) / cols:.4f} {(y + 15) / rows:.4f} {25 / cols:.4f} " \
                    f"{30 / rows:.4f}\n"
        cv2.imwrite(str(root / "images" / f"img{index:03d}.png"), picture)
        (root / "labels" / f"img{index:03d}.txt").write_text(label)
    return root


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, CliRunner]:
    data = synthetic_yolo(tmp_path_factory.mktemp("data") / "yolo")
    run = tmp_path_factory.mktemp("runs") / "smoke"
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(data), "--out", str(run), "--epochs", "1",
                                  "--device", "cpu", *SMOKE_FLAGS])
    assert result.exit_code == 0, result.output
    return data, run, runner


def split_parts(run: Path) -> dict[str, str]:
    with open(run / "split" / "split.csv", newline="") as fh:
        return {row["relative_path"]: row["split"] for row in csv.DictReader(fh)}


def history(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_smoke_run_writes_settings_split_and_calibrated_checkpoints(smoke_run) -> None:
    data, run, _ = smoke_run
    saved = config.load(run / "train.toml")
    assert saved.classifier.input_size == 32 and saved.classifier.epochs == 1
    split = json.loads((run / "split" / "split.json").read_text())
    assert split["samples"] == 32  # on disk, reused by resume and evaluate
    assert set(split_parts(run).values()) == {"train", "val", "test"}
    classifier = checkpoint.load(run / "classifier" / checkpoint.BEST, "classifier")
    # the training part's body parts (none in a YOLO set): build-engine's intended use
    parts = classifier["provenance"]["body_parts"]
    assert list(parts) == [""] and parts[""]["images"] == sum(
        part == "train" for part in split_parts(run).values())
    calibration = classifier["calibration"]
    assert calibration["temperature"] > 0
    points = calibration["operating_points"]
    assert 0 <= points["high_sensitivity"] <= 1 and 0 <= points["high_specificity"] <= 1
    assert classifier["provenance"]["dataset"] == str(data)
    assert classifier["model_spec"]["input_size"] == 32
    detector = checkpoint.load(run / "detector" / checkpoint.BEST, "detector")
    assert detector["model_spec"]["input_size"] == 96
    for kind in ("classifier", "detector"):
        rows = history(run / kind / checkpoint.HISTORY)
        assert [row["epoch"] for row in rows] == ["0"]
        assert float(rows[0]["train_loss"]) > 0


@pytest.mark.slow
def test_resume_continues_and_refuses_what_would_mix_runs(smoke_run) -> None:
    data, run, runner = smoke_run
    again = runner.invoke(main, ["train", str(data), "--out", str(run), *SMOKE_FLAGS])
    assert again.exit_code != 0 and "already holds a run: pass --resume" in again.output
    changed = runner.invoke(main, ["train", str(data), "--out", str(run), "--resume",
                                   "--task", "classifier", "--set", "classifier.lr=0.5"])
    assert changed.exit_code != 0
    assert "cannot resume with different [classifier].lr" in changed.output
    nothing = runner.invoke(main, ["train", str(data), "--out", str(run.parent / "none"),
                                   "--resume"])
    assert nothing.exit_code != 0 and "holds no run to resume" in nothing.output
    # the saved settings are the base of a resume: only the longer budget is given
    longer = runner.invoke(main, ["train", str(data), "--out", str(run), "--resume",
                                  "--task", "classifier", "--epochs", "2"])
    assert longer.exit_code == 0, longer.output
    rows = history(run / "classifier" / checkpoint.HISTORY)
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert checkpoint.load(run / "classifier" / checkpoint.LAST)["epoch"] == 1


@pytest.mark.slow
def test_evaluate_writes_metrics_plots_and_report(smoke_run) -> None:
    _, run, runner = smoke_run
    result = runner.invoke(main, ["evaluate", str(run), "--bootstrap", "50",
                                  "--device", "cpu"])
    assert result.exit_code == 0, result.output
    out = run / "eval-test"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classification"]["n"] == list(split_parts(run).values()).count("test")
    assert {"ap50", "ap50_95", "froc"} <= set(metrics["detection"])
    assert metrics["trained"] is True and "UNTRAINED" not in metrics["title"]
    assert metrics["model"]["classifier"]["checkpoint"].endswith("best.pt")
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["classification"]["n"]
    assert sum(int(row["label"]) for row in rows) == metrics["classification"]["positives"]
    assert all(0 <= float(row["probability"]) <= 1 for row in rows)
    assert all(Path(row["image"]).is_file() for row in rows)
    with open(out / "boxes.csv", newline="") as fh:
        boxes = list(csv.DictReader(fh))
    assert len(boxes) == metrics["detection"]["predictions"]
    for box in boxes:  # source pixels, clipped to the image
        x0, y0, x1, y1 = (float(box[k]) for k in ("x0", "y0", "x1", "y1"))
        rows_, cols = cv2.imread(box["image"], cv2.IMREAD_GRAYSCALE).shape
        assert 0 <= x0 <= x1 <= cols and 0 <= y0 <= y1 <= rows_ and 0 < float(box["score"]) <= 1
    plots = [out / link for link in metrics["plots"].values()]
    assert len(plots) >= 6
    for plot in plots:
        assert plot.read_bytes()[:8] == PNG_SIGNATURE, plot
    report = (out / "report.md").read_text()
    assert "## Classification" in report and "## Detector" in report
    assert all(f"]({link})" in report for link in metrics["plots"].values())


def test_evaluate_without_checkpoints_says_so(tmp_path: Path) -> None:
    config.save(config.load(None), tmp_path / "train.toml")
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path)])
    assert result.exit_code != 0 and "has the run been trained?" in result.output


def test_data_inspect_cli(tmp_path: Path) -> None:
    data = synthetic_yolo(tmp_path / "yolo", n=6)
    cv2.imwrite(str(data / "images" / "copy.png"),
                cv2.flip(cv2.imread(str(data / "images" / "img000.png")), 1))
    (data / "labels" / "copy.txt").write_text("")
    result = CliRunner().invoke(main, ["data", "inspect", str(data), "--out",
                                       str(tmp_path / "eda")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eda" / "summary.json").read_text())
    assert summary["images"] == 7
    groups = summary["duplicates"]["members"]
    assert any({Path(p).name for p in group} == {"img000.png", "copy.png"} for group in groups)
    missing = CliRunner().invoke(main, ["data", "inspect", str(tmp_path / "eda"), "--out",
                                        str(tmp_path / "x")])
    assert missing.exit_code != 0 and "Error:" in missing.output


@pytest.mark.slow
def test_build_engine_bundles_a_run_that_predicts_as_it_trained(smoke_run,
                                                                tmp_path: Path) -> None:
    """The bridge to the node: the bundle carries the validation calibration, and the node's
    predict gives the probability the training code computes for the same image."""
    data, run, runner = smoke_run
    out = tmp_path / "engines" / "smoke"
    result = runner.invoke(main, ["build-engine", str(run), "--out", str(out), "--name",
                                  "fractured-smoke", "--version", "0.0.1"])
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(out)
    manifest = bundle.manifest
    state = checkpoint.load(run / "classifier" / checkpoint.BEST)
    assert manifest.trained and manifest.name == "fractured-smoke"
    assert manifest.crop == "none" and manifest.preprocessing is None  # [data].crop's default
    assert manifest.classifier.temperature == state["calibration"]["temperature"]
    points = state["calibration"]["operating_points"]
    assert manifest.classifier.operating_points.high_sensitivity == points["high_sensitivity"]
    detector = checkpoint.load(run / "detector" / checkpoint.BEST)
    assert manifest.detector is not None and manifest.detector.input_size == 96
    assert manifest.detector.operating_points.high_specificity == \
        detector["calibration"]["operating_points"]["high_specificity"]
    assert manifest.training["classifier"]["data"]["train_images"] == \
        state["provenance"]["train_images"]
    # what `fractured region-check --split` checks a split against
    assert manifest.training["classifier"]["data"]["split_csv_sha256"] == \
        read_written(run / "split")[0]["csv_sha256"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "# Model card: fractured-smoke 0.0.1" in card and "not a diagnosis" in card
    assert "Synthetic images made by the fractured test suite." in card  # the data's credit
    assert "UNTRAINED" not in card

    image = data / "images" / "img001.png"
    model = FractureClassifier(variant="b0", num_labels=1)
    model.load_state_dict(state["model"])
    model.eval()
    letterboxed = letterbox_samples([Sample(image, 1, "")], 32)
    batch = torch.from_numpy(to_model_input([letterboxed.images[0].astype(np.float32)],
                                            IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        logit = float(model(batch)[0][0, 0])
    expected = 1 / (1 + np.exp(-logit / state["calibration"]["temperature"]))
    predicted = runner.invoke(main, ["predict", str(image), "--bundle", str(out), "--json"])
    assert predicted.exit_code == 0, predicted.output
    row = json.loads(predicted.output.strip().splitlines()[-1])
    assert row["model"] == {"name": "fractured-smoke", "version": "0.0.1", "trained": True}
    assert row["probability"] == pytest.approx(expected, abs=2e-3)


@pytest.mark.slow
def test_build_engine_carries_the_held_out_evaluation_and_notes_into_the_card(
        smoke_run, tmp_path: Path) -> None:
    _, run, runner = smoke_run
    report = tmp_path / "eval"
    evaluated = runner.invoke(main, ["evaluate", str(run), "--out", str(report),
                                     "--bootstrap", "50", "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads((report / "metrics.json").read_text())
    notes = tmp_path / "notes.md"
    notes.write_text("- Tried a smaller input: AUC fell by 0.02.\n")
    out = tmp_path / "bundle"
    result = runner.invoke(main, ["build-engine", str(run), "--out", str(out),
                                  "--evaluation", str(report), "--notes", str(notes),
                                  "--float16-weights"])
    assert result.exit_code == 0, result.output
    manifest = Bundle.load(out).manifest
    # no body part in the training data: no region to intend, so none is declared
    assert manifest.intended_use is None
    assert manifest.training["classifier"]["data"]["body_parts"][""]["images"] > 0
    # float16 storage: an ONNX-only bundle whose large weights are float16 on disk
    assert manifest.backends == ("onnxruntime",)
    assert not (out / CLASSIFIER_WEIGHTS).exists() and not (out / DETECTOR_WEIGHTS).exists()
    stored = {init.data_type for init in onnx.load(str(out / CLASSIFIER_FILE)).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in stored
    # ... and predict on the bundle says what the evaluation said of the same images
    with open(report / "predictions.csv", newline="") as fh:
        expected = {row["image"]: float(row["probability"]) for row in csv.DictReader(fh)}
    predicted = runner.invoke(main, ["predict", *expected, "--bundle", str(out), "--json"])
    assert predicted.exit_code == 0, predicted.output
    rows = [json.loads(line) for line in predicted.output.strip().splitlines()[-len(expected):]]
    assert [row["file"] for row in rows] == list(expected)
    for row in rows:
        assert row["probability"] == pytest.approx(expected[row["file"]], abs=2e-3)
    held_out = manifest.training["held_out"]
    assert held_out["split"] == "test"
    assert held_out["classification"]["roc_auc"] == metrics["classification"]["roc_auc"]
    assert held_out["detection"]["ap50"] == metrics["detection"]["ap50"]
    card = (out / "MODEL_CARD.md").read_text()
    auc = metrics["classification"]["roc_auc"]
    low, high = metrics["classification"]["roc_auc_ci95"]
    assert f"| all | {metrics['classification']['n']} |" in card
    assert f"{auc:.3f} ({low:.3f}-{high:.3f})" in card
    assert "## What was tried" in card and "AUC fell by 0.02" in card

    # a report of other checkpoints (here: the classifier's path rewritten) is refused
    metrics["model"]["classifier"]["checkpoint"] = str(tmp_path / "other" / "best.pt")
    (tmp_path / "other.json").write_text(json.dumps(metrics))
    refused = runner.invoke(main, ["build-engine", str(run), "--out", str(tmp_path / "b2"),
                                   "--evaluation", str(tmp_path / "other.json")])
    assert refused.exit_code == 1 and "run fractured evaluate on this run first" \
        in refused.output
    assert not (tmp_path / "b2").exists()


@pytest.mark.slow
def test_a_new_detector_joins_the_classifier_of_a_shipped_bundle(smoke_run,
                                                                 tmp_path: Path) -> None:
    """--classifier-bundle: the classifier (files, calibration, held-out scores) is the
    earlier bundle's byte for byte; the detector and its held-out boxes are this build's."""
    data, run, runner = smoke_run
    report = tmp_path / "eval"
    assert runner.invoke(main, ["evaluate", str(run), "--out", str(report), "--bootstrap",
                                "20", "--device", "cpu"]).exit_code == 0
    metrics = json.loads((report / "metrics.json").read_text())
    first = tmp_path / "fractured-0.1.0"
    built = runner.invoke(main, ["build-engine", str(run / "classifier" / checkpoint.BEST),
                                 "--out", str(first), "--float16-weights",
                                 "--evaluation", str(report)])
    assert built.exit_code == 0, built.output
    assert Bundle.load(first).manifest.detector is None
    second = tmp_path / "fractured-0.2.0"
    result = runner.invoke(main, ["build-engine", str(run / "detector" / checkpoint.BEST),
                                  "--classifier-bundle", str(first), "--out", str(second),
                                  "--version", "0.2.0", "--float16-weights",
                                  "--evaluation", str(report)])
    assert result.exit_code == 0, result.output
    old, new = (json.loads((path / "manifest.json").read_text()) for path in (first, second))
    assert new["files"][CLASSIFIER_FILE] == old["files"][CLASSIFIER_FILE]
    assert new["classifier"] == old["classifier"]
    assert new["detector"]["input_size"] == 96 and new["backends"] == ["onnxruntime"]
    assert new["training"]["classifier"]["from_bundle"] == "fractured-0.1.0"
    assert new["training"]["held_out"]["classification"] == \
        old["training"]["held_out"]["classification"]
    assert new["training"]["held_out"]["detection"]["ap50"] == metrics["detection"]["ap50"]
    card = (second / "MODEL_CARD.md").read_text()
    assert "Box detector: AP at IoU 0.5" in card and "No box detector" not in card
    image = str(data / "images" / "img001.png")
    answers = [json.loads(runner.invoke(main, ["predict", image, "--bundle", str(path),
                                               "--json"]).output.strip().splitlines()[-1])
               for path in (first, second)]
    assert answers[0]["probability"] == answers[1]["probability"]
    assert answers[1]["model"]["version"] == "0.2.0"
    # --detector-bundle, the other way round: this run's classifier (torch weights kept)
    # beside the detector of the second bundle, its files and held-out boxes unchanged
    third = tmp_path / "fractured-0.3.0"
    result = runner.invoke(main, ["build-engine", str(run / "classifier" / checkpoint.BEST),
                                  "--detector-bundle", str(second), "--out", str(third),
                                  "--version", "0.3.0"])
    assert result.exit_code == 0, result.output
    newest = json.loads((third / "manifest.json").read_text())
    assert newest["files"][DETECTOR_FILE] == new["files"][DETECTOR_FILE]
    assert newest["detector"] == new["detector"]
    assert newest["files"][CLASSIFIER_FILE] != new["files"][CLASSIFIER_FILE]  # float32 now
    assert newest["training"]["detector"]["from_bundle"] == "fractured-0.2.0"
    assert newest["training"]["held_out"]["detection"] == new["training"]["held_out"]["detection"]
    # no --evaluation: the card says the classifier was not scored, not "None images"
    card = (third / "MODEL_CARD.md").read_text()
    assert "The classifier has not been scored on held-out images" in card
    assert "None images" not in card and "Box detector: AP at IoU 0.5" in card
    # the reused detector has no torch weights, so neither has the bundle
    assert newest["backends"] == ["onnxruntime"] and CLASSIFIER_WEIGHTS not in newest["files"]
    # (every box, whatever the classifier says: the two classifiers' roundings differ)
    boxes = [json.loads(runner.invoke(main, ["predict", image, "--bundle", str(path), "--json",
                                             "--boxes", "always"]).output.strip()
                        .splitlines()[-1])["boxes"] for path in (second, third)]
    assert boxes[0] and boxes[0] == boxes[1]
    # a detector trained on other data (or another split) is refused
    other = tmp_path / "other-split"
    shutil.copytree(second, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["training"]["detector"]["data"]["train_images"] += 1
    (other / "manifest.json").write_text(json.dumps(manifest))
    mismatched = runner.invoke(main, ["build-engine", str(run / "classifier" / checkpoint.BEST),
                                      "--detector-bundle", str(other), "--out",
                                      str(tmp_path / "b5")])
    assert mismatched.exit_code == 1 and "other data or another split" in mismatched.output
    # ... but not one whose training machine decoded a different number of images
    manifest["training"]["detector"]["data"]["train_images"] -= 1
    manifest["training"]["detector"]["data"]["unreadable"] += 43
    (other / "manifest.json").write_text(json.dumps(manifest))
    decoded = runner.invoke(main, ["build-engine", str(run / "classifier" / checkpoint.BEST),
                                   "--detector-bundle", str(other), "--out",
                                   str(tmp_path / "decoded")])
    assert decoded.exit_code == 0, decoded.output
    # one model of each kind per bundle, and a detector alone is no bundle
    both = runner.invoke(main, ["build-engine", str(run), "--classifier-bundle", str(first),
                                "--out", str(tmp_path / "b3")])
    assert both.exit_code == 1 and "not both" in both.output
    both = runner.invoke(main, ["build-engine", str(run), "--detector-bundle", str(second),
                                "--out", str(tmp_path / "b6")])
    assert both.exit_code == 1 and "not both" in both.output
    assert not any((tmp_path / name).exists() for name in ("b3", "b5", "b6"))
    alone = runner.invoke(main, ["build-engine", str(run / "detector" / checkpoint.BEST),
                                 "--out", str(tmp_path / "b4")])
    assert alone.exit_code == 1 and "--classifier-bundle" in alone.output


@pytest.mark.slow
def test_the_crop_goes_from_train_toml_to_the_manifest_per_model(smoke_run,
                                                                      tmp_path: Path) -> None:
    """[data].crop is recorded in the checkpoint and written to the bundle's manifest,
    where the node reads it; a detector trained the other way keeps its own crop."""
    data, run, runner = smoke_run
    cropped = tmp_path / "cropped"
    result = runner.invoke(main, ["train", str(data), "--out", str(cropped), "--task",
                                  "classifier", "--epochs", "1", "--device", "cpu",
                                  *SMOKE_FLAGS, "--set", "data.crop=exposed_field"])
    assert result.exit_code == 0, result.output
    best = cropped / "classifier" / checkpoint.BEST
    assert checkpoint.load(best)["model_spec"]["crop"] == "exposed_field"
    assert "crop" not in checkpoint.load(run / "classifier" / checkpoint.BEST)["model_spec"]
    out = tmp_path / "fractured-cropped"
    built = runner.invoke(main, ["build-engine", str(best), "--out", str(out)])
    assert built.exit_code == 0, built.output
    assert Bundle.load(out).manifest.crop == "exposed_field"
    assert json.loads((out / "manifest.json").read_text())["preprocessing"] == \
        {"crop": "exposed_field"}
    apart = runner.invoke(main, ["build-engine", str(best),
                                 str(run / "detector" / checkpoint.BEST),
                                 "--out", str(tmp_path / "apart")])
    assert apart.exit_code == 0, apart.output
    manifest = Bundle.load(tmp_path / "apart").manifest
    assert (manifest.crop, manifest.detector_crop) == ("exposed_field", "none")
    assert json.loads((tmp_path / "apart" / "manifest.json").read_text())["preprocessing"] == \
        {"crop": "exposed_field", "detector_crop": "none"}


def test_build_engine_refuses_unfinished_and_smoke_checkpoints(tmp_path: Path) -> None:
    base = {"kind": "classifier", "epoch": 0, "model": {}, "settings": {}, "model_spec": {}}
    checkpoint.save(tmp_path / "last.pt", base)
    checkpoint.save(tmp_path / "smoke.pt", {**base, "calibration": {}, "limited": True})
    runner = CliRunner()
    unfinished = runner.invoke(main, ["build-engine", str(tmp_path / "last.pt"), "--out",
                                      str(tmp_path / "b1")])
    assert unfinished.exit_code == 1 and "no calibration, so the run did not finish" \
        in unfinished.output
    smoke = runner.invoke(main, ["build-engine", str(tmp_path / "smoke.pt"), "--out",
                                 str(tmp_path / "b2")])
    assert smoke.exit_code == 1 and "a smoke run" in smoke.output
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_a_resnet_classifier_trains_in_bfloat16_on_the_cpu_and_keeps_float32_weights() -> None:
    torch.manual_seed(0)
    model = FractureClassifier(variant="resnet18", num_labels=1)
    assert model.architecture == "resnet18+attention"
    images, labels = torch.rand(8, 3, 64, 64), torch.tensor([1.0, 0.0] * 4)
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    settings = config.load(None, ["classifier.variant=resnet18"]).classifier
    optimizer = optimiser(model.parameters(), settings)
    device = Device.choose("cpu", amp=True, channels_last=True, cpu_bf16=True)
    assert device.cpu_bf16 and not device.amp  # float16 AMP is CUDA's; bf16 the CPU's
    before = model.head.weight.detach().clone()
    loss = train_classifier_epoch(model, loader, FractureLoss(), optimizer,
                                  torch.amp.GradScaler("cuda", enabled=False), device, "t")
    assert np.isfinite(loss) and not torch.equal(before, model.head.weight)
    assert model.head.weight.dtype == torch.float32
    with device.autocast(training=True):
        assert model(images[:1])[0].dtype == torch.bfloat16
    with device.autocast():  # validation and calibration: float32, as in the node
        assert model(images[:1])[0].dtype == torch.float32


@pytest.mark.slow
def test_weight_averaging_validates_and_ships_the_averaged_weights(tmp_path: Path) -> None:
    data = synthetic_yolo(tmp_path / "yolo", n=16)
    flags = [*SMOKE_FLAGS, "--set", "classifier.ema_decay=0.5", "--set",
             "classifier.batch_size=2", "--task", "classifier",
             "--device", "cpu"]
    runner = CliRunner()
    first = runner.invoke(main, ["train", str(data), "--out", str(tmp_path / "run"),
                                 "--epochs", "1", *flags])
    assert first.exit_code == 0, first.output
    best = checkpoint.load(tmp_path / "run" / "classifier" / checkpoint.BEST)
    last = checkpoint.load(tmp_path / "run" / "classifier" / checkpoint.LAST)
    averaged = {key.removeprefix("module."): value for key, value in last["average"].items()
                if key.startswith("module.")}
    # best.pt holds the averaged weights; calibration then moved the head's bias by its shift
    shift = best["calibration"]["logit_shift"]
    assert all(torch.equal(best["model"][key], averaged[key]) for key in best["model"]
               if key != "head.bias")
    assert torch.allclose(best["model"]["head.bias"], averaged["head.bias"] + shift)
    assert not torch.equal(best["model"]["head.weight"], last["model"]["head.weight"])
    resumed = runner.invoke(main, ["train", str(data), "--out", str(tmp_path / "run"),
                                   "--resume", "--task", "classifier", "--epochs", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert checkpoint.load(tmp_path / "run" / "classifier" / checkpoint.LAST)["epoch"] == 1


def test_a_setting_added_later_counts_as_its_default_on_resume() -> None:
    now = dataclasses.asdict(config.load(None))
    older = dataclasses.asdict(config.load(None))
    del older["classifier"]["ema_decay"]  # a checkpoint from before the key existed
    assert checkpoint.changed_settings(older, now, "classifier") == []
    changed = dataclasses.asdict(config.load(None, ["classifier.ema_decay=0.9"]))
    assert checkpoint.changed_settings(older, changed, "classifier") == [
        "[classifier].ema_decay"]
    longer = dataclasses.asdict(config.load(None, ["classifier.epochs=99",
                                                   "detector.lr=0.5"]))
    assert checkpoint.changed_settings(now, longer, "classifier") == []  # free / other task


def test_augmentation_added_later_stays_off_for_a_run_saved_before_it(tmp_path: Path) -> None:
    saved = tmp_path / "train.toml"
    config.save(config.load(None), saved)
    text = saved.read_text()
    saved.write_text("\n".join(line for line in text.splitlines()
                               if not line.startswith(("gamma_p", "jpeg_p"))) + "\n")
    resumed = config.load(saved, saved_run=True)
    assert resumed.augment.gamma_p == 0.0 and resumed.augment.jpeg_p == 0.0
    assert resumed.augment.window_p == config.load(None).augment.window_p  # it was saved
    assert config.load(saved).augment.gamma_p > 0  # a train.toml to start a run from
    older = dataclasses.asdict(resumed)
    del older["augment"]["gamma_p"]  # a checkpoint from before the key existed
    assert checkpoint.changed_settings(older, dataclasses.asdict(resumed), "classifier") == []
    assert checkpoint.changed_settings(older, dataclasses.asdict(config.load(None)),
                                       "classifier") == ["[augment].gamma_p",
                                                         "[augment].jpeg_p"]


def test_box_supervision_heats_box_cells_cools_normal_images_and_leaves_the_rest() -> None:
    from fractured.training.losses import IN_BOXES, NO_FRACTURE, UNSUPERVISED, BoxSupervision

    loss = BoxSupervision()
    masks = torch.zeros(3, 64, 64, dtype=torch.uint8)
    masks[0, 0:16, 0:16] = 1  # the top-left quarter of a 2 x 2 CAM
    kinds = torch.tensor([IN_BOXES, NO_FRACTURE, UNSUPERVISED])
    cam = torch.zeros(3, 2, 2, requires_grad=True)
    loss(cam, masks, kinds).backward()
    grad = cam.grad
    assert grad[0, 0, 0] < 0 and torch.all(grad[0].flatten()[1:] == 0)  # hot; rest free
    assert torch.all(grad[1] > 0)  # every cell of a normal image is pushed down
    assert torch.all(grad[2] == 0)  # a fracture without boxes adds nothing
    nothing = torch.zeros(1, 2, 2, requires_grad=True)
    assert loss(nothing, masks[2:], kinds[2:]).item() == 0.0


def test_boxed_images_carry_masks_that_move_with_the_pixels(tmp_path: Path) -> None:
    from fractured.training.data import BoxedClassifierImages
    from fractured.training.losses import IN_BOXES, NO_FRACTURE

    picture = np.zeros((100, 100), np.uint8)
    picture[10:30, 60:90] = 255
    cv2.imwrite(str(tmp_path / "a.png"), picture)
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((100, 100), np.uint8))
    samples = [Sample(tmp_path / "a.png", 1, "", boxes=(BoxLabel(0.6, 0.1, 0.9, 0.3),)),
               Sample(tmp_path / "b.png", 0, "", boxes=())]
    data = BoxedClassifierImages(
        letterbox_samples(samples, 64), mean=(0.5,) * 3, std=(0.5,) * 3,
        transform=train_transform(AugmentSettings(rotation=10, zoom=0.1, brightness=0,
                                                  contrast=0), boxes=True))
    torch.manual_seed(0)
    for _ in range(10):
        image, label, mask, kind = data[0]
        bright = image[0] > 0.5
        assert label == 1 and kind == IN_BOXES
        assert mask[bright].float().mean() > 0.95  # the bright block lies in the mask
    _, label, mask, kind = data[1]
    assert label == 0 and kind == NO_FRACTURE and not mask.any()


@pytest.mark.slow
def test_box_weight_trains_through_the_cli(tmp_path: Path) -> None:
    data = synthetic_yolo(tmp_path / "yolo", n=16)
    result = CliRunner().invoke(main, [
        "train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1",
        "--task", "classifier", "--device", "cpu", *SMOKE_FLAGS,
        "--set", "classifier.box_weight=1.0"])
    assert result.exit_code == 0, result.output
    rows = history(tmp_path / "run" / "classifier" / checkpoint.HISTORY)
    assert float(rows[0]["train_loss"]) > 0
    with pytest.raises(ConfigError, match=r"\[classifier\]\.box_weight"):
        config.load(None, ["classifier.box_weight=-1"])
