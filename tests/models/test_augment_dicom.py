"""The augmentation steps that bridge JPEG exports and DICOM: window, gamma, bit depth,
JPEG, sharpness and collimation borders (training.transforms)."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from fractured.config import ConfigError
from fractured.training import config
from fractured.training.config import AugmentSettings
from fractured.training.transforms import as_box_target, train_transform

SIZE = 64
PAD = 12  # letterbox padding rows above and below, as a landscape image gets
OFF: dict[str, Any] = {"rotation": 0.0, "zoom": 0.0, "hflip": False, "vflip": False,
                       "brightness": 0.0, "contrast": 0.0, "gamma_p": 0.0, "window_p": 0.0,
                       "bits_p": 0.0, "jpeg_p": 0.0, "sharpness_p": 0.0, "border_p": 0.0}
STEPS = {"gamma": {"gamma_p": 1.0}, "window": {"window_p": 1.0, "window": 0.2},
         "bits": {"bits_p": 1.0}, "jpeg": {"jpeg_p": 1.0},
         "sharpness": {"sharpness_p": 1.0, "sharpness": 1.0},
         "border": {"border_p": 1.0, "border_width": 0.4}}
BOXES = torch.tensor([[20.0, 20.5, 30.0, 28.0], [34.5, 30.0, 44.0, 40.0]])


def only(**settings: Any) -> AugmentSettings:
    """Every random step off but those given."""
    return AugmentSettings(**{**OFF, **settings})


def letterboxed() -> tv_tensors.Image:
    """A textured grey image in [0.05, 0.95] between exact-black padding rows."""
    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((SIZE - 2 * PAD, SIZE)).astype(np.float32), (0, 0), 2)
    texture += np.linspace(0.0, 1.0, SIZE, dtype=np.float32)  # a gradient left to right
    texture = 0.05 + 0.9 * (texture - texture.min()) / (texture.max() - texture.min())
    image = np.zeros((SIZE, SIZE), np.float32)
    image[PAD:SIZE - PAD] = texture
    return tv_tensors.Image(torch.from_numpy(image)[None])


def boxed(transform: Any, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    image, target = transform(letterboxed(), as_box_target(BOXES.clone(),
                                                           torch.ones(2, dtype=torch.int64), SIZE))
    return image.as_subclass(torch.Tensor), target["boxes"].as_subclass(torch.Tensor)


@pytest.mark.parametrize("step", STEPS)
def test_each_step_changes_the_image_when_on_and_not_when_off(step: str) -> None:
    grey = letterboxed()
    on = train_transform(only(**STEPS[step]))
    off = train_transform(only(**{key: 0.0 if key.endswith("_p") else value
                                  for key, value in STEPS[step].items()}))
    for seed in range(5):
        torch.manual_seed(seed)
        assert not torch.equal(on(grey), grey), f"seed {seed}"
        assert torch.equal(off(grey), grey)


def test_steps_keep_range_dtype_and_the_letterbox_padding_black() -> None:
    """Padding is exact black at the node; no step may paint, blur or lift it."""
    every = train_transform(only(**{key: value for settings in STEPS.values()
                                    for key, value in settings.items()}))
    grey = letterboxed()
    for seed in range(20):
        torch.manual_seed(seed)
        out = every(grey)
        assert out.dtype == torch.float32 and out.shape == grey.shape
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert not out[..., :PAD, :].any() and not out[..., SIZE - PAD:, :].any()


def test_the_same_seed_gives_the_same_image() -> None:
    transform = train_transform(AugmentSettings(gamma_p=1, window_p=1, bits_p=1, jpeg_p=1,
                                                sharpness_p=1, border_p=1))
    grey = letterboxed()
    outputs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        outputs.append(transform(grey))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_borders_never_cover_a_box_and_leave_boxes_unchanged() -> None:
    original = letterboxed().as_subclass(torch.Tensor)
    transform = train_transform(only(**STEPS["border"]), boxes=True)
    painted = 0
    for seed in range(60):
        image, boxes = boxed(transform, seed)
        assert torch.equal(boxes, BOXES)
        for x0, y0, x1, y1 in BOXES.tolist():
            under = (..., slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1))))
            assert torch.equal(image[under], original[under]), f"seed {seed}"
        painted += not torch.equal(image, original)
    assert painted > 30  # the bands were painted, beside the boxes

    # Without boxes (the classifier's transform) the same bands do reach those pixels,
    # so the boxed transform's restraint above is what kept them clear.
    plain = train_transform(only(**STEPS["border"]))
    x0, y0, x1, y1 = (int(v) for v in BOXES[0].tolist())
    covered = 0
    for seed in range(60):
        torch.manual_seed(seed)
        out = plain(letterboxed())
        covered += not torch.equal(out[..., y0:y1, x0:x1], original[..., y0:y1, x0:x1])
    assert covered > 0


def test_no_step_moves_or_drops_a_box() -> None:
    """With every step on and no geometry, the detector's boxes come out as they went in,
    with an image in range."""
    transform = train_transform(only(**{key: value for settings in STEPS.values()
                                        for key, value in settings.items()}), boxes=True)
    for seed in range(10):
        image, boxes = boxed(transform, seed)
        assert torch.equal(boxes, BOXES)
        assert image.dtype == torch.float32
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


@pytest.mark.parametrize(("flag", "key"), [
    ("augment.gamma_p=1.5", "gamma_p"),
    ("augment.border_p=-0.1", "border_p"),
    ("augment.jpeg_p=2", "jpeg_p"),
    ("augment.gamma=0.8", "gamma"),
    ("augment.window=0.5", "window"),
    ("augment.min_bits=1", "min_bits"),
    ("augment.min_bits=9", "min_bits"),
    ("augment.jpeg_min_quality=0", "jpeg_min_quality"),
    ("augment.jpeg_min_quality=100", "jpeg_min_quality"),
    ("augment.sharpness=1.5", "sharpness"),
    ("augment.border_width=0.6", "border_width"),
])
def test_nonsense_augment_values_are_refused_naming_the_key(flag: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[augment\]\.{key}:"):
        config.load(None, [flag])
