"""Native (numba) block path of ``error.page_hinkley``: chunk sums and River's Page-Hinkley in one loop.

:meth:`drift.detectors.errors.ErrorPageHinkley.update_many` hands a merchant's block of prequential errors
to :func:`page_hinkley_block`, which does, value by value, what ``Detector.update`` -> ``_ChunkedError._observe``
-> ``ErrorPageHinkley._observe_sum`` -> ``river.drift.PageHinkley.update`` do: warm-up counting, the chunk's
exact sum (:func:`exact_sum`, CPython's ``math.fsum``: the correctly rounded sum, so bit-identical), River's
recursion in River's order of operations (its running mean, ``alpha * s + dev - delta``, the self-reset after
a detection), the peak, the cool-down and the fresh test after a reported detection. Python then dates the
windows and builds the events. The per-value path (``update``) keeps calling River and is the reference the
kernel is tested against, value for value (tests/test_drift_native.py).

Compiled (or loaded from the on-disk cache, as :mod:`streams.slot_kernels`) when first imported, with the
error detectors, before the worker's first record.
"""

from __future__ import annotations

from pathlib import Path

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

import numpy as np  # noqa: E402
from numba import njit  # noqa: E402  (the cache dir must be set before numba reads its configuration)

#: slots of the ``state`` array of :func:`page_hinkley_block` (read, and written back): the detector's counts
#: (exact in float64), River's state (its mean's count and value, the sums, the extremes, the flag), the peak,
#: the parameters as River holds them (``alpha ** chunk``, ``delta * chunk``, the threshold), then the open chunk
(N_SEEN, WARMUP, QUIET_UNTIL, COOLDOWN, SINCE_RESET, CHUNK, MIN_INSTANCES, N_PENDING, PH_N, PH_MEAN, SUM_INC, SUM_DEC,
 MIN_INC, MAX_DEC, DETECTED, PEAK, ALPHA, DELTA, THRESHOLD, PENDING) = range(20)
#: columns of the detections :func:`page_hinkley_block` writes
HIT_CHUNK, HIT_STATISTIC, HIT_MEAN_BEFORE, HIT_SINCE_RESET = range(4)


@njit("float64(float64[::1], int64, float64[::1])", cache=True, nogil=True)
def exact_sum(values, n, partials):
    """``math.fsum(values[:n])`` (CPython's algorithm: Shewchuk's partials, then half-even rounding across
    them); ``partials`` is scratch of length >= ``n``. Non-finite values: inf/nan as ``fsum`` gives them."""
    m = 0
    special, inf_sum = 0.0, 0.0
    for j in range(n):
        x = values[j]
        xsave = x
        i = 0
        for k in range(m):
            y = partials[k]
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo != 0.0:
                partials[i] = lo
                i += 1
            x = hi
        m = i
        if x != 0.0:
            if not np.isfinite(x):
                if np.isfinite(xsave):
                    raise OverflowError("intermediate overflow in fsum")
                if np.isinf(xsave):
                    inf_sum += xsave
                special += xsave
                m = 0
            else:
                partials[m] = x
                m += 1
    if special != 0.0:
        if np.isnan(inf_sum):
            raise ValueError("-inf + inf in fsum")
        return special
    hi = 0.0
    if m > 0:
        m -= 1
        hi = partials[m]
        lo = 0.0
        while m > 0:
            x = hi
            m -= 1
            y = partials[m]
            hi = x + y
            lo = y - (hi - x)
            if lo != 0.0:
                break
        if m > 0 and ((lo < 0.0 and partials[m - 1] < 0.0) or (lo > 0.0 and partials[m - 1] > 0.0)):
            y = lo * 2.0
            x = hi + y
            if y == x - hi:
                hi = x
    return hi


@njit(cache=True, nogil=True, inline="always")
def _fresh_test(state):
    """River's ``PageHinkley._reset`` (also what a new ``PageHinkley`` holds)."""
    state[PH_N] = 0.0
    state[PH_MEAN] = 0.0
    state[SUM_INC] = 0.0
    state[SUM_DEC] = 0.0
    state[MIN_INC] = np.inf
    state[MAX_DEC] = -1.0
    state[DETECTED] = 0.0


@njit("UniTuple(int64, 2)(float64[::1], float64[::1], int64[::1], float64[:, ::1])", cache=True, nogil=True)
def page_hinkley_block(values, state, ends, hits):
    """Feed ``values`` in order, updating ``state`` in place (the slots above; the open chunk's values from
    ``PENDING`` on). Writes the positions of the values that completed a chunk to ``ends`` and one row per
    reported detection to ``hits`` (chunk number among those, statistic, River's mean before the chunk in
    single errors, chunks since the test was last reset): both need ``len(values) // chunk + 1`` rows.
    Returns how many of each."""
    chunk, warmup, cooldown = int(state[CHUNK]), state[WARMUP], state[COOLDOWN]
    alpha, delta, threshold, min_instances = state[ALPHA], state[DELTA], state[THRESHOLD], state[MIN_INSTANCES]
    n_seen, quiet, since, n_pending = state[N_SEEN], state[QUIET_UNTIL], state[SINCE_RESET], int(state[N_PENDING])
    scratch = np.empty(chunk, dtype=np.float64)
    n_ends, n_hits = 0, 0
    for i in range(len(values)):
        n_seen += 1.0
        if n_seen <= warmup:
            continue
        state[PENDING + n_pending] = values[i]
        n_pending += 1
        if n_pending < chunk:
            continue
        total = exact_sum(state[PENDING:PENDING + chunk], chunk, scratch)
        n_pending = 0
        ends[n_ends] = i
        n_ends += 1
        mean_before = state[PH_MEAN] / chunk
        if state[DETECTED] != 0.0:  # River resets itself on the update after a detection
            _fresh_test(state)
        state[PH_N] += 1.0
        state[PH_MEAN] += (1.0 / state[PH_N]) * (total - state[PH_MEAN])
        dev = total - state[PH_MEAN]
        state[SUM_INC] = alpha * state[SUM_INC] + dev - delta
        state[SUM_DEC] = alpha * state[SUM_DEC] + dev + delta
        if state[SUM_INC] < state[MIN_INC]:
            state[MIN_INC] = state[SUM_INC]
        if state[SUM_DEC] > state[MAX_DEC]:
            state[MAX_DEC] = state[SUM_DEC]
        if state[PH_N] >= min_instances:
            state[DETECTED] = 1.0 if state[SUM_INC] - state[MIN_INC] > threshold else 0.0
        since += 1.0
        statistic = state[SUM_INC] - state[MIN_INC]
        if n_seen >= quiet and statistic > state[PEAK]:
            state[PEAK] = statistic
        if state[DETECTED] != 0.0 and n_seen >= quiet:
            hits[n_hits, HIT_CHUNK] = n_ends - 1
            hits[n_hits, HIT_STATISTIC] = statistic
            hits[n_hits, HIT_MEAN_BEFORE] = mean_before
            hits[n_hits, HIT_SINCE_RESET] = since
            n_hits += 1
            quiet = n_seen + cooldown
            _fresh_test(state)  # the detector starts a new test after a reported detection
            since = 0.0
    state[N_SEEN], state[QUIET_UNTIL], state[SINCE_RESET], state[N_PENDING] = n_seen, quiet, since, n_pending
    return n_ends, n_hits
