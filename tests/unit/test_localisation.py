"""The pointing game and the exact interval behind every proportion the card reports."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from fractured.engine.pipeline import heatmap_peak
from fractured.training.evaluation.classification import clopper_pearson
from fractured.training.evaluation.localisation import pointing_game, points_into


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (41, 143), (1, 1)])
def test_the_exact_interval_is_scipys(k: int, n: int) -> None:
    expected = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((expected.low, expected.high), abs=1e-9)


def test_an_impossible_proportion_is_refused() -> None:
    with pytest.raises(ValueError, match="11 successes of 10 trials"):
        clopper_pearson(11, 10)


def _heatmap(shape: tuple[int, int], hot: tuple[int, int]) -> np.ndarray:
    heatmap = np.zeros(shape, dtype=np.float32)
    heatmap[hot[1], hot[0]] = 1.0  # (x, y)
    return heatmap


def test_the_peak_is_found_in_x_y_order() -> None:
    assert heatmap_peak(_heatmap((40, 60), (50, 7))) == (50.0, 7.0)
    assert heatmap_peak(np.zeros((40, 60), dtype=np.float32)) is None  # nothing hot
    assert points_into((50, 7), [[45, 0, 55, 10]]) and not points_into((50, 7), [[0, 0, 5, 5]])
    assert points_into((50, 7), [[60, 0, 70, 10]], tolerance=10.0)


def test_the_pointing_game_counts_hits_strictly_and_within_tolerance() -> None:
    peaks = [(20.0, 20.0),  # inside its box
             (60.0, 20.0),  # 10 px right of its box
             (90.0, 90.0),  # far from its box
             None,  # no peak: a miss
             (5.0, 5.0)]  # a normal image: not counted
    boxes = [[[10, 10, 30, 30]], [[30, 10, 50, 30]], [[10, 10, 30, 30]], [[0, 0, 99, 99]],
             np.zeros((0, 4))]
    result = pointing_game(peaks, boxes)
    assert result["images"] == 4 and result["strict"]["k"] == 1
    assert result["within_tolerance"]["k"] == 2
    assert result["strict"]["rate"] == pytest.approx(1 / 4)
    assert result["strict"]["interval"] == pytest.approx(clopper_pearson(1, 4))
    assert pointing_game(peaks, boxes, tolerance=0.0)["within_tolerance"]["k"] == 1
    with pytest.raises(ValueError, match="2 peaks for 1 box sets"):
        pointing_game(peaks[:2], boxes[:1])
