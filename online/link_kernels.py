"""Native (numba) kernels of the recommender's link rows (``online.link_rows``): counting links, capping rows,
merging weighted rows into scores, and the membership test of a proposal.

A table's rows are arrays: row ``r = row_of[a]`` (-1: item code ``a`` has none) holds in ``nbr[r, :n[r]]`` the
codes of the items ``a`` links to, in the order their first link came (a capped row in its kept order), in
``val`` their counts, in ``tot[r]`` the row's total; ``row_code[r]`` is ``a``. Rows are made as items first
link to something, so an item only linked to costs no row. Counts are
whole numbers held as float64, so every total and every score is the float the former dict code computed, in
the same order of operations (tests/test_recs_update_fast.py, tests/test_recs_fastpath.py).

Compiled for one signature each when this module is imported and cached on disk (``cache=True``), as
:mod:`online.kernels`. None releases the GIL: :func:`related` uses the table's scratch row, which a
concurrent request must not share.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)

_ROWS = "int32[:, ::1], float64[:, ::1], int32[::1], float64[::1]"


@njit(cache=True, inline="always")
def _cap(nbr, val, n, tot, r, keep):
    """Keep row ``r``'s ``keep`` largest counts, ties in row order, in that order; the total is their sum."""
    k = n[r]
    order = np.argsort(-val[r, :k], kind="mergesort")[:keep]
    kept_nbr, kept_val = nbr[r, order].copy(), val[r, order].copy()
    total = 0.0
    for j in range(keep):
        nbr[r, j] = kept_nbr[j]
        val[r, j] = kept_val[j]
        total += kept_val[j]
    n[r] = keep
    tot[r] = total


@njit(cache=True, inline="always")
def _add(nbr, val, n, tot, row_code, row_of, used, a, b, keep):
    """One link ``a -> b`` (codes): its count and ``a``'s total + 1, ``a``'s row made if it has none (row
    ``used``); a row past ``2 * keep`` links is capped. Returns the rows in use."""
    r = row_of[a]
    if r < 0:
        r = used
        row_of[a] = r
        row_code[r] = a
        n[r] = 0
        tot[r] = 0.0
        used += 1
    k = n[r]
    for j in range(k):
        if nbr[r, j] == b:
            val[r, j] += 1.0
            tot[r] += 1.0
            return used
    nbr[r, k] = b
    val[r, k] = 1.0
    n[r] = k + 1
    tot[r] += 1.0
    if k + 1 > 2 * keep:
        _cap(nbr, val, n, tot, r, keep)
    return used


@njit(cache=True, inline="always")
def _mark(nbr, n, r, pos, value):
    """``pos[b] = j`` for each link ``b`` at position ``j`` of row ``r`` (``value`` -1: unmark them)."""
    for j in range(n[r]):
        pos[nbr[r, j]] = j if value >= 0 else -1


@njit(f"UniTuple(int64, 2)({_ROWS}, int32[::1], int32[::1], int64, int64[::1], int64, int64, boolean, int32[::1])",
      cache=True)
def apply_links(nbr, val, n, tot, row_code, row_of, used, ops, start, keep, both, pos):
    """Apply queued steps ``ops`` = ``item, k, s_1 .. s_k`` repeated, in order, from ``ops[start]``: each
    ``s -> item`` link, and with ``both`` (co-occurrence) each ``item -> s`` (a row takes its links in the
    step's order; links of different rows do not interact, so the item's own row takes its ``k`` at once,
    found through ``pos``, the table's scratch per code, -1 everywhere as it is left). Stops before a step
    that could need more rows than the arrays hold; returns where it stopped and the rows in use."""
    i = start
    while i < ops.shape[0]:
        item, k = ops[i], ops[i + 1]
        if used + k + 1 > n.shape[0]:
            return i, used
        for s in range(i + 2, i + 2 + k):
            used = _add(nbr, val, n, tot, row_code, row_of, used, ops[s], item, keep)
        if both and k:
            r = row_of[item]  # _add's lines, not a shared helper: a helper returning (row, used) cost ~10% here
            if r < 0:
                r = used
                row_of[item] = r
                row_code[r] = item
                n[r] = 0
                tot[r] = 0.0
                used += 1
            _mark(nbr, n, r, pos, 0)
            for s in range(i + 2, i + 2 + k):
                b = ops[s]
                p = pos[b]
                if p >= 0:
                    val[r, p] += 1.0
                    tot[r] += 1.0
                    continue
                m = n[r]
                nbr[r, m] = b
                val[r, m] = 1.0
                n[r] = m + 1
                tot[r] += 1.0
                pos[b] = m
                if m + 1 > 2 * keep:
                    _mark(nbr, n, r, pos, -1)
                    _cap(nbr, val, n, tot, r, keep)
                    _mark(nbr, n, r, pos, 0)
            _mark(nbr, n, r, pos, -1)
        i += 2 + k
    return i, used


@njit(f"Tuple((int32[::1], float64[::1]))({_ROWS}, int32[::1], int64[::1], float64[::1], int64, int32[::1])",
      cache=True)
def related(nbr, val, n, tot, row_of, sources, weights, limit, slot):
    """Σ weight · count / (the source row's total) per linked item, items in first-seen order; past ``limit``
    items, the ``limit`` best by score, ties in that order. ``sources`` with a negative code have no row.
    ``slot`` is the table's scratch per code (-1 everywhere, as it is left)."""
    m = 0
    for s in range(sources.shape[0]):
        if sources[s] >= 0 and row_of[sources[s]] >= 0:
            m += n[row_of[sources[s]]]
    codes = np.empty(m, dtype=np.int32)
    scores = np.empty(m, dtype=np.float64)
    m = 0
    for s in range(sources.shape[0]):
        a = sources[s]
        if a < 0 or row_of[a] < 0 or n[row_of[a]] == 0:
            continue
        r = row_of[a]
        scale = weights[s] / tot[r]
        for j in range(n[r]):
            b = nbr[r, j]
            p = slot[b]
            if p < 0:
                slot[b] = m
                codes[m] = b
                scores[m] = scale * val[r, j]
                m += 1
            else:
                scores[p] = scores[p] + scale * val[r, j]
    for p in range(m):
        slot[codes[p]] = -1
    if m > limit:
        best = np.argsort(-scores[:m], kind="mergesort")[:limit]
        return codes[best], scores[best]
    return codes[:m].copy(), scores[:m].copy()


@njit("boolean(int32[:, ::1], int32[::1], int32[::1], int64[::1], int64)", cache=True)
def linked(nbr, n, row_of, sources, b):
    """Whether any of the items ``sources`` (negative: no code) has a row linking to ``b``."""
    for s in range(sources.shape[0]):
        a = sources[s]
        if a >= 0 and row_of[a] >= 0:
            r = row_of[a]
            for j in range(n[r]):
                if nbr[r, j] == b:
                    return True
    return False


__all__ = ["apply_links", "related", "linked"]
