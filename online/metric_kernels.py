"""Native (numba) kernels of the prequential evaluator: a block folded into one stream's metrics in one loop
(:func:`fold_block`), and the grouping of a block's rows by merchant (:func:`group_order`, also used by the
drift monitor).

:func:`fold_block` adds to a :class:`online.prequential.StreamMetrics`'s per-bin count, sum of p and sum of y
what ``np.bincount`` of the bin of each p (``min(int(p * bins), bins - 1)``) gave the evaluator before:
the block's per-bin sums are accumulated from zero in stream order (as ``np.bincount`` does), then added,
so the totals are bit-identical (tests/test_online_prequential.py); it counts the positive labels and writes
the pairs into the ring of the last ``window`` ones in the same loop.

Compiled (or loaded from the on-disk cache, as :mod:`online.kernels`) when first imported.
"""

from __future__ import annotations

from pathlib import Path

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)


@njit("int64(float64[::1], float64[::1], int64, float64[:], float64[:])", cache=True, nogil=True)
def write_ring(ring_y, ring_p, at, y, p):
    """Write the pairs ``(y, p)`` in order into the ring arrays from position ``at`` on (wrapping; only the last
    ring-length pairs of a longer block); returns where the next pair goes (the oldest pair once full)."""
    window = len(ring_y)
    for i in range(max(len(y) - window, 0), len(y)):
        ring_y[at] = y[i]
        ring_p[at] = p[i]
        at += 1
        if at == window:
            at = 0
    return at


@njit("UniTuple(int64, 2)(float64[:], float64[:], float64[::1], float64[::1], float64[::1], float64[::1], "
      "float64[::1], int64)", cache=True, nogil=True)
def fold_block(p, y, count, sum_p, sum_y, ring_y, ring_p, at):
    """Add the block ``(y, p)``'s count, sum of p and sum of y per probability bin (``len(count)`` bins) and
    write it into the ring (:func:`write_ring`); returns the number of positive labels and the ring's next
    position."""
    bins = len(count)
    block = np.zeros((3, bins))
    positives = 0
    for i in range(len(p)):
        b = min(int(p[i] * bins), bins - 1)
        block[0, b] += 1.0
        block[1, b] += p[i]
        block[2, b] += y[i]
        if y[i] != 0.0:
            positives += 1
    for b in range(bins):
        count[b] += block[0, b]
        sum_p[b] += block[1, b]
        sum_y[b] += block[2, b]
    return positives, write_ring(ring_y, ring_p, at, y, p)


@njit("int64[::1](intp[::1], intp[::1])", cache=True, nogil=True)
def group_order(first, order):
    """Stable counting sort of the rows by group, a group being named by the position of its first row
    (``first[i]``: where the key of row ``i`` first appears): writes to ``order`` the rows of the group seen
    first, then of the next, ... each ascending; returns where each group's rows end in ``order``."""
    n = len(first)
    starts = np.zeros(n, dtype=np.int64)
    for i in range(n):
        starts[first[i]] += 1
    groups, start = 0, 0
    for b in range(n):  # bucket b is used only if b is some group's first row: ascending b = order of appearance
        if starts[b]:
            size = starts[b]
            starts[b] = start
            start += size
            groups += 1
    ends = np.empty(groups, dtype=np.int64)
    for i in range(n):
        b = first[i]
        order[starts[b]] = i
        starts[b] += 1
    g = 0
    for b in range(n):
        if first[b] == b:  # row b opens its group: its bucket's fill position is now the group's end
            ends[g] = starts[b]
            g += 1
    return ends
