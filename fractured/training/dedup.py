"""Near-duplicate radiographs: a perceptual hash per image and groups of images that match.

Public fracture scores of "98 %" come from augmented copies of one X-ray landing on both
sides of a train/test line. A split must keep such copies together, and a dataset
without patient IDs (FracAtlas) has nothing else to go on, so every image is hashed.

The hash is a 64-bit DCT pHash written here with numpy/cv2: the image is shrunk to
32 x 32 (area interpolation, which averages rather than aliases), cv2.dct taken, and the
8 x 8 lowest frequencies kept; a bit is set where a coefficient exceeds the median of
the 63 non-DC ones. The DC bit is always 0: it is the mean brightness, which must not
count, and any brightness/contrast change a*x + b only moves DC and scales the rest, so
the bits do not change. Low frequencies also change little under small rotations,
crops, zooms, noise and JPEG re-encoding, so such copies match through the hash's own
(partial, measured below) robustness.

Flips do not: each image is also hashed as its horizontal flip, vertical flip and 180°
rotation, and two images are compared at the least Hamming distance over the 4 x 4
combinations. The flipped hashes cost nothing extra: mirroring the 32 x 32 image changes
only the signs of its DCT coefficients, (-1)^v across and (-1)^u down. Every hash has
exactly 31 of its 63 bits set (a median split), so distances are even.

The default threshold, 4, is the largest before one chain of look-alikes swallows the
set: no threshold tells copies from look-alikes, since 63 low-frequency bits see the
layout of a radiograph, not the patient. The measurements on FracAtlas behind it are in
docs/training/dedup.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from fractured.engine.preprocess import DecodeError
from fractured.engine.sources import load_image

#: Hamming distance at or below which two images are treated as one radiograph (see above).
DEFAULT_THRESHOLD = 4

#: The row `image_hashes` gives a file it could not decode: never a real hash (those have
#: 31 bits set) and never grouped with anything.
UNREADABLE = np.uint64(2**64 - 1)

#: The variants each image is hashed as, in the column order of `image_hashes`.
VARIANTS = ("identity", "flip_horizontal", "flip_vertical", "rotate_180")

_SIZE = 32
_BLOCK = 8
_ROWS, _COLS = np.indices((_BLOCK, _BLOCK))
# Sign of each low-frequency DCT coefficient under each variant (see module docstring).
_SIGNS = np.stack([
    np.ones((_BLOCK, _BLOCK)),
    (-1.0) ** _COLS,
    (-1.0) ** _ROWS,
    (-1.0) ** (_ROWS + _COLS),
]).astype(np.float32)

Progress = Callable[[int, int], None]


def hash_pixels(pixels: np.ndarray) -> np.ndarray:
    """The four variant hashes (identity, h-flip, v-flip, 180°) of one image, uint64 (4,).

    `pixels` is a 2-D greyscale array (any dtype, any range: the bits ignore a positive
    scale and an offset); colour images are averaged to grey first.
    """
    image = np.asarray(pixels, dtype=np.float32)
    if image.ndim == 3:
        image = image.mean(axis=2)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    small = cv2.resize(image, (_SIZE, _SIZE), interpolation=cv2.INTER_AREA)
    block = cv2.dct(small)[:_BLOCK, :_BLOCK]
    variants = (_SIGNS * block).reshape(len(VARIANTS), -1)
    medians = np.median(variants[:, 1:], axis=1, keepdims=True)
    bits = variants > medians
    bits[:, 0] = False  # DC: brightness, not structure
    return np.packbits(bits, axis=1).view(">u8").astype(np.uint64).ravel()


def image_hashes(paths: Sequence[str | Path], *, workers: int | None = None,
                 progress: Progress | None = None,
                 unreadable: dict[int, str] | None = None) -> np.ndarray:
    """Hash every image file: uint64 (N, 4), one row per path in order, columns `VARIANTS`.

    Decoding dominates, and cv2 and the JPEG/DICOM decoders release the GIL, so threads
    share the work (`workers`, default up to 4). `progress(done, total)` is called after
    each image. An unreadable image raises DecodeError naming the file (a broken file
    should be fixed or removed) unless `unreadable` is given: then its message is stored
    there under the path's index and its row is `UNREADABLE`, for callers that carry on
    without it as the training loader does (FracAtlas has 51 truncated JPEGs).
    """
    def attempt(path: str | Path) -> np.ndarray | str:
        try:
            return hash_file(path)
        except DecodeError as exc:
            if unreadable is None:
                raise DecodeError(f"{exc} (fix or remove this file: an unreadable image "
                                  "cannot be checked for duplicates)") from exc
            return str(exc)

    total = len(paths)
    hashes = np.zeros((total, len(VARIANTS)), dtype=np.uint64)
    failed: dict[int, str] = {}
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for index, result in enumerate(pool.map(attempt, paths)):
            if isinstance(result, str):
                failed[index] = result
                hashes[index] = UNREADABLE
            else:
                hashes[index] = result
            if progress is not None:
                progress(index + 1, total)
    if unreadable is not None:
        unreadable.update(failed)
    return hashes


def hash_file(path: str | Path) -> np.ndarray:
    """`hash_pixels` of one image file; DecodeError naming the file when it cannot be read."""
    return hash_pixels(load_image(path).pixels)


def _as_variants(hashes: np.ndarray) -> np.ndarray:
    """Hashes as uint64 (N, V): a plain (N,) array is one variant per image."""
    array = np.asarray(hashes, dtype=np.uint64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"hashes must be (N,) or (N, variants), got shape {array.shape}")
    return array


def readable(hashes: np.ndarray) -> np.ndarray:
    """Indices of the rows that hold a real hash (not `UNREADABLE`), ascending."""
    return np.flatnonzero(_as_variants(hashes)[:, 0] != UNREADABLE)


def _distances(hashes: np.ndarray, row: int, others: slice | np.ndarray) -> np.ndarray:
    """Least Hamming distance of image `row` to each of `others` over all variant pairs."""
    xor = hashes[others][:, :, None] ^ hashes[row][None, None, :]
    return np.bitwise_count(xor).min(axis=(1, 2))


def distance(hashes: np.ndarray, a: int, b: int) -> int:
    """Least Hamming distance between images `a` and `b` over all variant pairs."""
    array = _as_variants(hashes)
    return int(_distances(array, a, np.array([b]))[0])


def nearest_neighbours(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each image, its closest other image and their distance: (index, distance).

    Used to choose and check a threshold: the distribution of these distances shows
    where copies end and merely similar radiographs begin. An image with no readable
    other (or unreadable itself) gets index -1, distance 64.
    """
    array = _as_variants(hashes)
    nearest = np.full(len(array), -1, dtype=np.int64)
    best = np.full(len(array), 64, dtype=np.int64)
    rows = readable(array)
    if len(rows) < 2:
        return nearest, best
    subset = array[rows]
    for position, row in enumerate(rows):
        found = _distances(subset, position, slice(None)).astype(np.int64)
        found[position] = 65  # not itself
        nearest[row] = rows[found.argmin()]
        best[row] = found.min()
    return nearest, best


def duplicate_groups(hashes: np.ndarray, threshold: int = DEFAULT_THRESHOLD) -> list[list[int]]:
    """Groups of images within `threshold` of each other, joined transitively.

    Any pair at distance <= threshold joins (union-find), so a ~ b and b ~ c make one
    group even when a and c are further apart: a chain of augmented copies is one
    radiograph. Returns only groups of two or more, each sorted, ordered by first index;
    `UNREADABLE` rows are in none.
    Row by row over a vectorised xor/popcount: 3,268 images take well under a second.
    """
    rows = readable(hashes)
    array = _as_variants(hashes)[rows]
    parent = list(range(len(array)))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for row in range(len(array) - 1):
        close = np.flatnonzero(_distances(array, row, slice(row + 1, None)) <= threshold)
        for other in close + row + 1:
            a, b = root(row), root(int(other))
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for item in range(len(array)):
        members.setdefault(root(item), []).append(int(rows[item]))
    return sorted(group for group in members.values() if len(group) > 1)
