"""Near-duplicate hashing: copies of one radiograph match, different anatomy does not."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fractured.engine.preprocess import DecodeError
from fractured.training.dedup import (
    DEFAULT_THRESHOLD,
    UNREADABLE,
    distance,
    duplicate_groups,
    hash_pixels,
    image_hashes,
    nearest_neighbours,
)


def limb(seed: int, angle: float = 20.0, joint: tuple[float, float] = (0.55, 0.45)) -> np.ndarray:
    """A synthetic radiograph: soft tissue, two long bones meeting a third at a joint, noise."""
    rng = np.random.default_rng(seed)
    height, width = 400, 320
    image = np.full((height, width), 0.08, np.float32)
    cv2.ellipse(image, (width // 2, height // 2), (110, 210), angle, 0, 360, 0.25, -1)
    jx, jy = int(joint[0] * width), int(joint[1] * height)
    slant = np.sin(np.radians(angle))
    for dx, thickness in ((-18, 22), (20, 14)):
        cv2.line(image, (jx + dx, jy), (jx + dx + int(140 * slant), height), 0.75, thickness)
    cv2.line(image, (jx, jy), (jx - int(150 * np.sin(np.radians(angle + 15))), 0), 0.8, 30)
    cv2.circle(image, (jx, jy), 28, 0.9, -1)
    cv2.circle(image, (jx, jy), 16, 0.6, -1)
    image = cv2.GaussianBlur(image, (0, 0), 3)
    image += rng.normal(0, 0.03, image.shape).astype(np.float32)
    return np.clip(image, 0, 1)


def rotated(image: np.ndarray, degrees: float) -> np.ndarray:
    height, width = image.shape
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REPLICATE)


def pair_distance(a: np.ndarray, b: np.ndarray) -> int:
    return distance(np.stack([hash_pixels(a), hash_pixels(b)]), 0, 1)


BASE = limb(0)
HEIGHT, WIDTH = BASE.shape
COPIES = {
    "horizontal flip": BASE[:, ::-1],
    "vertical flip": BASE[::-1],
    "180° rotation": BASE[::-1, ::-1],
    "4° rotation": rotated(BASE, 4.0),
    "crop by a few percent": cv2.resize(BASE[12:HEIGHT - 8, 10:WIDTH - 6], (WIDTH, HEIGHT)),
    "zoomed in and resized": cv2.resize(BASE[20:, 10:WIDTH - 10], (300, 380)),
    "brighter, less contrast": np.clip(BASE * 0.8 + 0.1, 0, 1),
    "gamma 0.7": BASE ** 0.7,
    "re-exposed (new noise)": np.clip(
        BASE + np.random.default_rng(5).normal(0, 0.03, BASE.shape), 0, 1).astype(np.float32),
}
DIFFERENT = {
    "other angle": limb(2, angle=-35, joint=(0.4, 0.6)),
    "steep, high joint": limb(3, angle=60, joint=(0.5, 0.3)),
    "joint moved down": limb(4, angle=20, joint=(0.35, 0.7)),
}


def test_hash_layout_64_bits_dc_clear_31_set() -> None:
    """The DC (brightness) bit, the most significant, is 0; a median split sets 31 of 63."""
    hashes = hash_pixels(BASE)
    assert hashes.shape == (4,) and hashes.dtype == np.uint64
    assert all(int(value) >> 63 == 0 for value in hashes)
    assert np.bitwise_count(hashes).tolist() == [31, 31, 31, 31]


def test_variant_hashes_equal_hashes_of_the_flipped_image() -> None:
    """The sign trick on DCT coefficients gives exactly the hash of the mirrored image."""
    hashes = hash_pixels(BASE)
    for column, flipped in enumerate((BASE, BASE[:, ::-1], BASE[::-1], BASE[::-1, ::-1])):
        assert hash_pixels(np.ascontiguousarray(flipped))[0] == hashes[column]


@pytest.mark.parametrize("name", list(COPIES))
def test_copies_of_one_radiograph_match(name: str) -> None:
    assert pair_distance(BASE, COPIES[name]) <= DEFAULT_THRESHOLD


def test_rotation_tolerance_is_partial_but_below_different_anatomy() -> None:
    """pHash is not rotation invariant: on this image -4° lands at 10 bits while +4° (above)
    is within the threshold; both stay well short of images with different anatomy."""
    nearest_different = min(pair_distance(BASE, image) for image in DIFFERENT.values())
    for degrees in (-4.0, -2.0, 2.0, 4.0):
        assert pair_distance(BASE, rotated(BASE, degrees)) < nearest_different - 8


@pytest.mark.parametrize("name", list(DIFFERENT))
def test_different_anatomy_does_not_match(name: str) -> None:
    assert pair_distance(BASE, DIFFERENT[name]) > 2 * DEFAULT_THRESHOLD


def test_brightness_and_contrast_leave_the_bits_unchanged() -> None:
    assert (hash_pixels(BASE * 0.5 + 0.2) == hash_pixels(BASE)).all()
    assert (hash_pixels((BASE * 65535).astype(np.uint16)) == hash_pixels(BASE)).all()


def test_colour_is_averaged_and_empty_images_are_refused() -> None:
    colour = np.stack([BASE, BASE, BASE], axis=2)
    assert (hash_pixels(colour) == hash_pixels(BASE)).all()
    with pytest.raises(ValueError, match="non-empty 2-D"):
        hash_pixels(np.zeros((0, 5), np.float32))


def flipped_bits(value: int, bits: list[int]) -> int:
    for bit in bits:
        value ^= 1 << bit
    return value


def test_groups_are_transitive_and_only_pairs_or_more_are_returned() -> None:
    """a~b (4 bits) and b~c (4 other bits) make one group although a and c are 8 apart."""
    a = 0x0123_4567_89AB_CDEF
    b = flipped_bits(a, [1, 2, 3, 4])
    c = flipped_bits(b, [10, 11, 12, 13])
    far = a ^ 0xFFFF_FFFF_0000_0000
    hashes = np.array([far, c, a, flipped_bits(far, [40]), b, far ^ 0xFFFF], dtype=np.uint64)
    assert distance(hashes, 2, 1) == 8
    assert duplicate_groups(hashes, threshold=4) == [[0, 3], [1, 2, 4]]
    assert duplicate_groups(hashes, threshold=3) == [[0, 3]]
    assert duplicate_groups(hashes, threshold=0) == []


def test_groups_compare_every_variant_pair() -> None:
    """Image 1's flip variant equals image 0's identity hash: they match through it."""
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=(3, 4), dtype=np.uint64)
    hashes[1, 2] = hashes[0, 0]
    assert duplicate_groups(hashes, threshold=0) == [[0, 1]]
    assert distance(hashes, 1, 0) == 0


def test_nearest_neighbours() -> None:
    a = 0x0F0F_0F0F_0F0F_0F0F
    hashes = np.array([a, flipped_bits(a, [0, 1]), a ^ 0xFFFF_FFFF, flipped_bits(a, [5])],
                      dtype=np.uint64)
    nearest, distances = nearest_neighbours(hashes)
    assert nearest.tolist() == [3, 0, 1, 0]
    assert distances.tolist() == [1, 2, 30, 1]
    assert nearest_neighbours(hashes[:1])[0].tolist() == [-1]


def test_image_hashes_reads_files_in_order_with_progress(tmp_path: Path) -> None:
    images = [BASE, DIFFERENT["other angle"], BASE[:, ::-1]]
    paths = []
    for index, image in enumerate(images):
        paths.append(tmp_path / f"{index}.png")
        cv2.imwrite(str(paths[-1]), (image * 255).round().astype(np.uint8))
    calls: list[tuple[int, int]] = []
    hashes = image_hashes(paths, workers=2,
                          progress=lambda done, total: calls.append((done, total)))
    assert hashes.shape == (3, 4) and hashes.dtype == np.uint64
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert duplicate_groups(hashes) == [[0, 2]]


def test_unreadable_image_raises_naming_the_file(tmp_path: Path) -> None:
    good, broken = tmp_path / "good.png", tmp_path / "broken.jpg"
    cv2.imwrite(str(good), (BASE * 255).astype(np.uint8))
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DecodeError, match=r"broken\.jpg.*fix or remove"):
        image_hashes([good, broken])


def test_unreadable_images_can_be_set_aside(tmp_path: Path) -> None:
    """With `unreadable` given, broken files get the UNREADABLE row, which never groups
    (not even with another broken file) and has no nearest neighbour."""
    paths = [tmp_path / "a.png", tmp_path / "bad1.jpg", tmp_path / "b.png", tmp_path / "bad2.jpg"]
    cv2.imwrite(str(paths[0]), (BASE * 255).astype(np.uint8))
    cv2.imwrite(str(paths[2]), (BASE[::-1] * 255).astype(np.uint8))
    paths[1].write_bytes(b"\xff\xd8 truncated")
    paths[3].write_bytes(b"")
    unreadable: dict[int, str] = {}
    hashes = image_hashes(paths, unreadable=unreadable)
    assert sorted(unreadable) == [1, 3] and "bad1.jpg" in unreadable[1]
    assert (hashes[[1, 3]] == UNREADABLE).all() and (hashes[[0, 2]] != UNREADABLE).all()
    assert duplicate_groups(hashes) == [[0, 2]]
    nearest, distances = nearest_neighbours(hashes)
    assert nearest.tolist() == [2, -1, 0, -1] and distances.tolist()[1::2] == [64, 64]
