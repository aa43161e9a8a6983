"""Native (numba) kernels of the prequential evaluator: a block's reliability bins in one loop, and the
grouping of a block's rows by merchant (:func:`group_order`, also used by the drift monitor).

:func:`add_to_bins` adds to a :class:`online.prequential.StreamMetrics`'s per-bin count, sum of p and sum of y
what ``np.bincount`` of the bin of each p (``min(int(p * bins), bins - 1)``) gave the evaluator before:
the block's per-bin sums are accumulated from zero in stream order (as ``np.bincount`` does), then added,
so the totals are bit-identical (tests/test_online_prequential.py).

Compiled (or loaded from the on-disk cache, as :mod:`online.kernels`) when first imported.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

if "NUMBA_CACHE_DIR" not in os.environ and not os.access(Path(__file__).parent, os.W_OK):
    os.environ["NUMBA_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "fedstream-numba")

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)


@njit("void(float64[:], float64[:], float64[::1], float64[::1], float64[::1])", cache=True, nogil=True)
def add_to_bins(p, y, count, sum_p, sum_y):
    """Add the block ``(y, p)``'s count, sum of p and sum of y per probability bin (``len(count)`` bins)."""
    bins = len(count)
    block = np.zeros((3, bins))
    for i in range(len(p)):
        b = min(int(p[i] * bins), bins - 1)
        block[0, b] += 1.0
        block[1, b] += p[i]
        block[2, b] += y[i]
    for b in range(bins):
        count[b] += block[0, b]
        sum_p[b] += block[1, b]
        sum_y[b] += block[2, b]


@njit("int64[::1](intp[::1], int64, intp[::1])", cache=True, nogil=True)
def group_order(code, groups, order):
    """Counting sort of the rows by ``code`` (0 .. groups-1), stable: writes to ``order`` the rows of group 0,
    then of group 1, ... each ascending; returns where each group's rows end in ``order``."""
    ends = np.zeros(groups, dtype=np.int64)
    for i in range(len(code)):
        ends[code[i]] += 1
    start = 0
    for g in range(groups):
        start += ends[g]
        ends[g] = start
    fill = ends.copy()
    for i in range(len(code) - 1, -1, -1):
        fill[code[i]] -= 1
        order[fill[code[i]]] = i
    return ends
