"""fractured.engine.percentiles gives np.percentile's numbers, bit for bit.

The exposed-field search uses it in place of np.percentile for speed; any difference,
even in the last bit, could move a field by a line and so change what a shipped model
sees. Each case compares the exact values and dtypes.
"""

from __future__ import annotations

import numpy as np
import pytest

from fractured.engine.percentiles import column_percentiles, percentiles


def _same(found: object, expected: object) -> None:
    found_array, expected_array = np.asarray(found), np.asarray(expected)
    assert found_array.dtype == expected_array.dtype
    assert found_array.shape == expected_array.shape
    assert np.array_equal(found_array, expected_array), (found, expected)
    assert np.isscalar(found) == np.isscalar(expected)


def _images(seed: int) -> list[np.ndarray]:
    """Shapes of what the image code sees: display images with a plateau of air (ties
    in the tails), noise, uint16 stored values, float64 after a modality LUT, and small
    and odd sizes where the sample is too small to help."""
    rng = np.random.default_rng(seed)
    air = np.full((700, 640), 0.05, np.float32)
    air[:, 200:500] = rng.uniform(0.2, 0.9, (700, 300)).astype(np.float32)
    return [
        rng.uniform(0.0, 1.0, (2000, 1700)).astype(np.float32),
        air,
        np.clip(rng.normal(0.5, 0.2, (999, 777)), 0, 1).astype(np.float32),
        rng.integers(0, 4096, (1200, 1000), dtype=np.uint16),
        rng.normal(1000.0, 300.0, (800, 600)),
        np.zeros((300, 300), np.float32),
        rng.uniform(0.0, 1.0, (5, 7)).astype(np.float32),
        np.float32([0.25]),
    ]


@pytest.mark.parametrize("q", [[0.5, 99.5], [1, 99], [2, 98], [0, 100], [50], [10, 90],
                               0.5, 99.5, 90.0, 100.0, 0.0, 37])
@pytest.mark.parametrize("seed", [0, 1])
def test_whole_array_percentiles_equal_numpys(q: float | list[float], seed: int) -> None:
    for image in _images(seed):
        _same(percentiles(image, q), np.percentile(image, q))


@pytest.mark.parametrize("q", [[2, 98], [0.5, 99.5], [0, 100], [50]])
@pytest.mark.parametrize("step", [1, 3, 4])
def test_column_percentiles_equal_numpys(q: list[float], step: int) -> None:
    for image in _images(2):
        if image.ndim != 2:
            continue
        for view in (image[::step], image.T[::step]):
            _same(column_percentiles(view, q), np.percentile(view, q, axis=0))


def test_a_sample_that_misjudges_the_tail_falls_back_to_sorting() -> None:
    """The sampled values are the lowest of all, spread over a range the tail never
    reaches: the candidates below the sample's threshold are too few to hold the 0.5th
    percentile's ranks, and the answer still equals numpy's."""
    values = np.arange(1 << 16, dtype=np.float64) + (1 << 16)
    values[::61] = np.arange(values[::61].size)
    _same(percentiles(values, [0.5, 99.5]), np.percentile(values, [0.5, 99.5]))


def test_empty_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        percentiles(np.zeros(0, np.float32), [1, 99])
    with pytest.raises(ValueError, match="empty"):
        column_percentiles(np.zeros((0, 4), np.float32), [1, 99])
