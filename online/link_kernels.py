"""Native (numba) kernels of the recommender's link rows (``online.link_rows``): counting links, capping rows,
merging weighted rows into scores, and the membership test of a proposal.

A table's rows are arrays indexed by item code: ``nbr[a, :n[a]]`` the items ``a`` links to, in the order their
first link came (a capped row in its kept order), ``val`` their counts, ``tot[a]`` the row's total. Counts are
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

_TABLE = "int32[:, ::1], float64[:, ::1], int32[::1], float64[::1]"


@njit(cache=True, inline="always")
def _cap(nbr, val, n, tot, a, keep):
    """Keep row ``a``'s ``keep`` largest counts, ties in row order, in that order; the total is their sum."""
    k = n[a]
    order = np.argsort(-val[a, :k], kind="mergesort")[:keep]
    kept_nbr, kept_val = nbr[a, order].copy(), val[a, order].copy()
    total = 0.0
    for j in range(keep):
        nbr[a, j] = kept_nbr[j]
        val[a, j] = kept_val[j]
        total += kept_val[j]
    n[a] = keep
    tot[a] = total


@njit(cache=True, inline="always")
def _add(nbr, val, n, tot, a, b, keep):
    """One link ``a -> b``: its count and ``a``'s total + 1; a row past ``2 * keep`` links is capped."""
    k = n[a]
    for j in range(k):
        if nbr[a, j] == b:
            val[a, j] += 1.0
            tot[a] += 1.0
            return
    nbr[a, k] = b
    val[a, k] = 1.0
    n[a] = k + 1
    tot[a] += 1.0
    if k + 1 > 2 * keep:
        _cap(nbr, val, n, tot, a, keep)


@njit(f"void({_TABLE}, int64[::1], int64, boolean)", cache=True)
def apply_links(nbr, val, n, tot, ops, keep, both):
    """Apply queued steps ``ops`` = ``item, k, s_1 .. s_k`` repeated, in order: each ``s -> item`` link, and
    with ``both`` (co-occurrence) each followed by ``item -> s``."""
    i = 0
    while i < ops.shape[0]:
        item, k = ops[i], ops[i + 1]
        for s in range(i + 2, i + 2 + k):
            _add(nbr, val, n, tot, ops[s], item, keep)
            if both:
                _add(nbr, val, n, tot, item, ops[s], keep)
        i += 2 + k


@njit(f"Tuple((int32[::1], float64[::1]))({_TABLE}, int64[::1], float64[::1], int64, int32[::1])", cache=True)
def related(nbr, val, n, tot, sources, weights, limit, slot):
    """Σ weight · count / (the source row's total) per linked item, items in first-seen order; past ``limit``
    items, the ``limit`` best by score, ties in that order. ``sources`` with a negative code have no row.
    ``slot`` is the table's scratch (-1 everywhere, as it is left)."""
    m = 0
    for s in range(sources.shape[0]):
        a = sources[s]
        if a >= 0 and n[a] > 0:
            m += n[a]
    codes = np.empty(m, dtype=np.int32)
    scores = np.empty(m, dtype=np.float64)
    m = 0
    for s in range(sources.shape[0]):
        a = sources[s]
        if a < 0 or n[a] == 0:
            continue
        scale = weights[s] / tot[a]
        for j in range(n[a]):
            b = nbr[a, j]
            p = slot[b]
            if p < 0:
                slot[b] = m
                codes[m] = b
                scores[m] = scale * val[a, j]
                m += 1
            else:
                scores[p] = scores[p] + scale * val[a, j]
    for p in range(m):
        slot[codes[p]] = -1
    if m > limit:
        best = np.argsort(-scores[:m], kind="mergesort")[:limit]
        return codes[best], scores[best]
    return codes[:m].copy(), scores[:m].copy()


@njit("boolean(int32[:, ::1], int32[::1], int64[::1], int64)", cache=True)
def linked(nbr, n, sources, b):
    """Whether any of the rows ``sources`` (negative: no row) links to ``b``."""
    for s in range(sources.shape[0]):
        a = sources[s]
        if a >= 0:
            for j in range(n[a]):
                if nbr[a, j] == b:
                    return True
    return False


__all__ = ["apply_links", "related", "linked"]
