"""Percentiles as `np.percentile` gives them (its default "linear" method), bit for bit,
for the two shapes the image code asks for: the tails of a whole image, and the same
percentiles of each column of a sampled image.

`np.percentile` partitions a copy of the whole array on every call, and along a strided
axis for per-column percentiles. The exposed-field search asks for both several times an
image, and those calls were most of what cropping cost a study (bench/README.md). Here a
tail is found among the few values beyond a threshold read off a sparse sample (all
values are sorted only where the sample misjudges it), and columns are sorted in one
vectorised call along contiguous memory. The arithmetic after the sort is numpy's own,
in the same dtypes, so the results are the same numbers (tests/unit/test_percentiles.py)
and so are the fields found and what the models see. Values must be finite (display
images and stored pixel values are).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Percentiles below this (or above 100 minus it) are tails, found among candidates;
#: others sort everything.
TAIL_PERCENT = 5.0
#: Arrays smaller than this are sorted whole: a sample would save nothing.
_MIN_SAMPLED = 1 << 14
#: Every _SAMPLE_STEP-th value makes the sample a tail's threshold is read from.
_SAMPLE_STEP = 61
#: The threshold is the sample's percentile at this multiple of the tail's (plus a
#: tenth of a percent), so the candidates beyond it hold the tail with a wide margin.
_MARGIN = 2.0


def percentiles(values: np.ndarray, q: float | Sequence[float]) -> np.ndarray | np.generic:
    """`np.percentile(values, q)` over all of `values`."""
    flat = np.ravel(values)
    n = flat.size
    if n == 0:
        raise ValueError("percentiles of an empty array")
    virtual = (n - 1) * np.true_divide(q, 100)
    previous, following, gamma = _neighbours(virtual, n, weak=type(q) in (int, float))
    ranks = sorted({int(r) for r in np.ravel(previous)} | {int(r) for r in np.ravel(following)})
    value = dict(zip(ranks, _order_statistics(flat, ranks), strict=True))
    low = np.asarray([value[int(r)] for r in np.ravel(previous)], dtype=flat.dtype)
    high = np.asarray([value[int(r)] for r in np.ravel(following)], dtype=flat.dtype)
    if np.ndim(virtual) == 0:
        return _lerp(low[0], high[0], gamma)
    return _lerp(low, high, gamma)


def column_percentiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """`np.percentile(values, q, axis=0)` of a 2-D array: shape (len(q), columns)."""
    rows = values.shape[0]
    if rows == 0:
        raise ValueError("percentiles of an empty array")
    ordered = np.sort(np.ascontiguousarray(values.T), axis=1)
    virtual = (rows - 1) * np.true_divide(q, 100)
    previous, following, gamma = _neighbours(virtual, rows, weak=False)
    return _lerp(ordered[:, previous].T, ordered[:, following].T,
                 np.asarray(gamma).reshape(-1, 1))


def _neighbours(virtual: np.ndarray, n: int, *, weak: bool,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | float]:
    """The ranks either side of each virtual index and the weight between them, as
    numpy derives them: at or past the last rank both are the last, and the weight is
    taken from numpy's stand-in rank there, -1 (it multiplies a zero difference)."""
    floor = np.floor(virtual)
    above = np.asarray(virtual >= n - 1)
    previous = np.where(above, n - 1, floor).astype(np.intp)
    following = np.where(above, n - 1, floor + 1).astype(np.intp)
    gamma = np.asarray(virtual - np.where(above, -1, floor), dtype=np.asarray(virtual).dtype)
    return previous, following, float(gamma) if weak else gamma


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """numpy's interpolation between neighbouring order statistics, term for term."""
    difference = b - a
    below = a + difference * t
    above = b - difference * (1 - t)
    return np.where(np.asarray(t) >= 0.5, above, below)[()]


def _order_statistics(flat: np.ndarray, ranks: list[int]) -> list[np.generic]:
    """The values of the given ranks (0-based, ascending) in `flat`."""
    n = flat.size
    low = [r for r in ranks if r < n / 2]
    high = [r for r in ranks if r >= n / 2]
    deepest = max([(r + 1) / n for r in low] + [(n - r) / n for r in high])
    if n >= _MIN_SAMPLED and deepest * 100 <= TAIL_PERCENT:
        sample = np.sort(flat[::_SAMPLE_STEP])
        share = _MARGIN * deepest + 0.001
        found = {**_tail(flat, sample, low, share, low=True),
                 **_tail(flat, sample, high, share, low=False)}
        if len(found) == len(ranks):
            return [found[r] for r in ranks]
    ordered = np.sort(flat)
    return [ordered[r] for r in ranks]


def _tail(flat: np.ndarray, sample: np.ndarray, ranks: list[int], share: float, *,
          low: bool) -> dict[int, np.generic]:
    """The values of `ranks` from the candidates beyond the sample's `share` quantile
    on one side; nothing where the candidates do not hold every rank asked for."""
    if not ranks:
        return {}
    index = math.ceil(share * (sample.size - 1))
    if low:
        candidates = np.sort(flat[flat <= sample[index]])
        offset = 0
    else:
        candidates = np.sort(flat[flat >= sample[sample.size - 1 - index]])
        offset = flat.size - candidates.size
    if min(ranks) < offset or max(ranks) - offset >= candidates.size:
        return {}
    return {r: candidates[r - offset] for r in ranks}
