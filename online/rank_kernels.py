"""Native (numba) kernel of the recommender's reading side: the ranker's feature matrix from gathered values.

:func:`feature_rows` computes ``online.ranking.features`` from the values ``online.ranking.gather`` collects
once per call (per candidate: item statistics, source scores, popularity, category count, source mask; per
candidate the user chose before: the user's entry and the item's gap statistics) with the same float64
operations in the same order as the row-by-row Python code (``online.ranking.features_reference``), so the
matrix is bit for bit the same: libm's ``log``, ``log1p`` and ``exp`` on both sides, correctly rounded
``sqrt`` and ``/``, no fast-math (tests/test_recs_rank_fast.py).

Compiled for its one signature when this module is imported and cached on disk (``cache=True``), as
:mod:`online.kernels` (:func:`fedstream.native.use_writable_cache` first).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)

N_FEATURES = 22
PER_ITEM = 7  # blocks of n values: count, repeats (NaN: no statistics), co, trans, popularity, category count, mask
PER_HIT = 6  # blocks of h values: row, then (count, orders, last_time) interleaved, gap_sum, gap_sq
PARAMS = ("co_max", "trans_max", "pop_max", "merchant_repeat", "mean0", "var0", "when", "user_total")


@njit(cache=True, inline="always")
def _history(out, row, entry_count, entry_orders, entry_last, has_stats, repeats, gap_sum, gap_sq, params):
    """Columns 1-9 of a candidate the user chose before (``item_gap_model`` inlined, prior 3)."""
    merchant_repeat, mean0, var0, when = params[3], params[4], params[5], params[6]
    gap = max(when - entry_last, 1.0)
    n = repeats if has_stats else 0.0
    if not n:
        mean, sd = mean0, math.sqrt(var0)
    else:
        mean = (gap_sum + 3.0 * mean0) / (n + 3.0)
        var = (gap_sq + 3.0 * (var0 + mean0 * mean0)) / (n + 3.0) - mean * mean
        sd = math.sqrt(max(var, 0.25))
    z = (math.log(gap) - mean) / sd
    out[row, 1] = math.log1p(entry_count)
    out[row, 2] = 1.0
    out[row, 3] = math.log1p(entry_orders)
    out[row, 4] = math.log1p(gap / 3600.0) / 5.0
    out[row, 5] = math.exp(-gap / 86_400.0)
    out[row, 6] = math.exp(-0.5 * z * z)
    out[row, 8] = out[row, 7]
    out[row, 9] = merchant_repeat


@njit("float64[:, ::1](float64[::1], int64, int64, float64[::1])", cache=True)
def feature_rows(gathered, n, h, params):
    """The ``(n, 22)`` feature matrix of ``online.ranking.FEATURES`` from ``gathered`` (``PER_ITEM`` blocks of
    ``n`` values, then ``PER_HIT`` blocks of ``h`` values, see the constants) and ``params`` (:data:`PARAMS`)."""
    co_max, trans_max, pop_max, merchant_repeat, user_total = params[0], params[1], params[2], params[3], params[7]
    out = np.zeros((n, N_FEATURES))
    for row in range(n):
        count, repeats = gathered[row], gathered[n + row]
        out[row, 0] = 1.0
        if math.isnan(count):  # item_repeat_rate: the merchant's share without statistics, else prior 5
            out[row, 7] = merchant_repeat
        else:
            out[row, 7] = (repeats + 5.0 * merchant_repeat) / (count + 5.0)
            out[row, 15] = math.log1p(count) / 10.0
        c, t = gathered[2 * n + row], gathered[3 * n + row]
        out[row, 10] = math.log1p(10.0 * c)
        out[row, 11] = c / co_max
        out[row, 12] = math.log1p(10.0 * t)
        out[row, 13] = t / trans_max
        out[row, 14] = math.log(gathered[4 * n + row] / pop_max + 1e-4) / 9.2 + 1.0
        if user_total:
            out[row, 16] = gathered[5 * n + row] / user_total
        mask = int(gathered[6 * n + row])
        for bit in range(5):
            out[row, 17 + bit] = float((mask >> bit) & 1)
    hits = PER_ITEM * n
    for k in range(h):
        row = int(gathered[hits + k])
        entry = hits + h + 3 * k
        count = gathered[row]
        _history(out, row, gathered[entry], gathered[entry + 1], gathered[entry + 2], not math.isnan(count),
                 gathered[n + row], gathered[hits + 4 * h + k], gathered[hits + 5 * h + k], params)
    return out


__all__ = ["feature_rows", "PER_ITEM", "PER_HIT", "PARAMS", "N_FEATURES"]
