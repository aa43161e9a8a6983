"""Native (numba) kernels: exact sequential SGD, Adam and FTRL-Proximal over hashed index arrays, and the
recommender's pairwise AdaGrad step (:func:`pairwise_adagrad`).

Each ``*_learn`` kernel walks a batch of ``(n, F)`` slot indices and values row by row, exactly as
``learn_one`` would: predict the row at the current weights (written to ``out``, test-then-train), then
update every distinct slot of the row before the next row is predicted. A slot repeated inside a row
counts once, with the repeated values summed (as ``learn_one`` on a dict with colliding features).
While a row is learned, the next row's slots of every per-slot array are prefetched (:func:`_prefetch_row`):
the arrays are far larger than the caches, and the misses then overlap the arithmetic.
The per-slot arrays may be float64 or float32 (all of one learner's arrays share the dtype), or ``w`` may
be int16 q2.13 fixed point (value = code / 8192) over float32 statistics: :func:`_load` decodes it and
:func:`_store` writes it with randomized rounding (McMahan et al. 2013, section 4.4) drawn from numba's
generator, which the learner seeds (:func:`seed`) before each batch; arithmetic is float64 either way.
The numpy code in :mod:`online.learners` is the reference these kernels are tested against, value for
value (q2.13: within tolerance, as the two draw different random numbers).

Compilation: the kernels are compiled for the few signatures the learners use when this module is
imported, and cached on disk (``cache=True``): the first import on a machine compiles (seconds), later
imports load the cache (measured in ``online/README.md``). The cache goes next to this file when that
directory is writable, else to ``$NUMBA_CACHE_DIR`` or ``<tmp>/fedstream-numba`` (:mod:`fedstream.native`).
"""

from __future__ import annotations

import math
from pathlib import Path

from fedstream.native import use_writable_cache

use_writable_cache(Path(__file__).parent)

import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, types  # noqa: E402  (the cache dir must be set before numba reads its configuration)
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

CLIP = 35.0  # same |logit| cap as online.learners
Q_SCALE = 8192.0  # q2.13: 13 fractional bits
Q_MIN, Q_MAX = -32768, 32767
_ROWS = "int32[:, ::1], float64[:, ::1], float64[::1], float64[::1]"  # indices, values, labels, out


def _signatures(arrays: int, scalars: int) -> list[str]:
    """One signature per state layout: ``arrays`` per-slot arrays (all float64, all float32, or an int16
    q2.13 ``w`` and float32 statistics), the rows, then float64 scalars."""
    out = []
    for w, rest in (("float64", "float64"), ("float32", "float32"), ("int16", "float32")):
        states = ", ".join([f"{w}[::1]"] + [f"{rest}[::1]"] * (arrays - 1))
        out.append(f"void({states}, {_ROWS}{', float64' * scalars})")
    return out


def _load(w, slot):
    """``w[slot]`` as a float (q2.13 codes decoded)."""


def _store(w, slot, value):
    """``w[slot] = value`` (q2.13: randomized rounding to a code, clipped to the int16 range)."""


@overload(_load, inline="always")
def _load_impl(w, slot):
    if isinstance(w.dtype, types.Integer):
        return lambda w, slot: w[slot] / Q_SCALE
    return lambda w, slot: w[slot]


@overload(_store, inline="always")
def _store_impl(w, slot, value):
    if isinstance(w.dtype, types.Integer):
        def store_code(w, slot, value):
            w[slot] = min(max(math.floor(value * Q_SCALE + np.random.random()), Q_MIN), Q_MAX)
        return store_code

    def store(w, slot, value):
        w[slot] = value
    return store


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to start loading ``array[index]`` into its caches (LLVM's ``prefetch``: a hint, never a
    fault, no effect on any value)."""
    def codegen(context, builder, signature, args):
        array_type, index_type = signature.args
        data = context.make_array(array_type)(context, builder, args[0])
        at = context.cast(builder, args[1], index_type, types.intp)
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [at], wraparound=False)
        i8_pointer = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8_pointer.type, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(prefetch, [i8_pointer, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()
    return types.void(array, index), codegen


@njit(cache=True, inline="always")
def _prefetch_row(state, indices, row) -> None:
    """Prefetch ``state``'s entries of row ``row``'s slots (nothing past the last row). The learn kernels
    call it for the next row while they learn this one: the per-slot arrays are far larger than the caches,
    so nearly every slot of a row is a cache miss, and the next row's misses then overlap this row's
    arithmetic (measured in ``online/README.md``)."""
    if row < indices.shape[0]:
        for col in range(indices.shape[1]):
            _prefetch(state, indices[row, col])


@njit("void(int64)", cache=True)
def seed(value):
    """Seed the generator of the q2.13 randomized rounding (numba's own, per thread)."""
    np.random.seed(value)


@njit(cache=True, inline="always")
def _predict_row(w, indices, values, row) -> float:
    dot = 0.0
    for col in range(indices.shape[1]):
        dot += _load(w, indices[row, col]) * values[row, col]
    dot = min(max(dot, -CLIP), CLIP)
    return 1.0 / (1.0 + math.exp(-dot))


@njit(cache=True, inline="always")
def _has_duplicates(indices, row) -> bool:
    """Whether a slot repeats inside the row (no early exit: the comparisons vectorize)."""
    hits = 0
    for col in range(1, indices.shape[1]):
        slot = indices[row, col]
        for k in range(col):
            hits += indices[row, k] == slot
    return hits > 0


@njit(cache=True, inline="always")
def _merged_value(indices, values, row, col) -> float:
    """The summed value of ``indices[row, col]``'s slot in the row, or NaN if an earlier column has it."""
    slot = indices[row, col]
    for k in range(col):
        if indices[row, k] == slot:
            return math.nan
    value = values[row, col]
    for k in range(col + 1, indices.shape[1]):
        if indices[row, k] == slot:
            value += values[row, k]
    return value


@njit(_signatures(1, 2), cache=True, nogil=True)
def sgd_learn(w, indices, values, labels, out, learning_rate, l2):
    """SGD with lazy L2, one row at a time: ``w_i ← w_i − η (g_i + λ₂ w_i)`` on the row's slots."""
    _prefetch_row(w, indices, 0)
    for row in range(indices.shape[0]):
        _prefetch_row(w, indices, row + 1)
        p = _predict_row(w, indices, values, row)
        out[row] = p
        error = p - labels[row]
        duplicates = _has_duplicates(indices, row)
        for col in range(indices.shape[1]):
            value = _merged_value(indices, values, row, col) if duplicates else values[row, col]
            if value != value:
                continue
            slot = indices[row, col]
            weight = float(_load(w, slot))
            _store(w, slot, weight - learning_rate * (error * value + l2 * weight))


@njit(_signatures(3, 5), cache=True, nogil=True)
def adam_learn(w, m, v, indices, values, labels, out, learning_rate, beta_1, beta_2, eps, step):
    """Lazy Adam, one step per row; ``step`` is the step count before the batch (bias correction)."""
    _prefetch_row(w, indices, 0)
    _prefetch_row(m, indices, 0)
    _prefetch_row(v, indices, 0)
    for row in range(indices.shape[0]):
        _prefetch_row(w, indices, row + 1)
        _prefetch_row(m, indices, row + 1)
        _prefetch_row(v, indices, row + 1)
        p = _predict_row(w, indices, values, row)
        out[row] = p
        error = p - labels[row]
        duplicates = _has_duplicates(indices, row)
        t = step + row + 1.0
        lr = learning_rate * math.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for col in range(indices.shape[1]):
            value = _merged_value(indices, values, row, col) if duplicates else values[row, col]
            if value != value:
                continue
            slot = indices[row, col]
            g = error * value
            m_new = beta_1 * m[slot] + (1 - beta_1) * g
            v_new = beta_2 * v[slot] + (1 - beta_2) * g * g
            _store(w, slot, _load(w, slot) - lr * m_new / (math.sqrt(v_new) + eps))
            m[slot] = m_new
            v[slot] = v_new


@njit(_signatures(3, 4), cache=True, nogil=True)
def ftrl_learn(w, z, n, indices, values, labels, out, alpha, beta, l1, l2):
    """FTRL-Proximal (McMahan et al. 2013, Algorithm 1), one row at a time, ``w`` kept materialized."""
    _prefetch_row(w, indices, 0)
    _prefetch_row(z, indices, 0)
    _prefetch_row(n, indices, 0)
    for row in range(indices.shape[0]):
        _prefetch_row(w, indices, row + 1)
        _prefetch_row(z, indices, row + 1)
        _prefetch_row(n, indices, row + 1)
        p = _predict_row(w, indices, values, row)
        out[row] = p
        error = p - labels[row]
        duplicates = _has_duplicates(indices, row)
        for col in range(indices.shape[1]):
            value = _merged_value(indices, values, row, col) if duplicates else values[row, col]
            if value != value:
                continue
            slot = indices[row, col]
            g = error * value
            n_old = float(n[slot])
            n_new = n_old + g * g
            sigma = (math.sqrt(n_new) - math.sqrt(n_old)) / alpha
            z_new = z[slot] + g - sigma * _load(w, slot)
            z[slot] = z_new
            n[slot] = n_new
            if abs(z_new) <= l1:
                _store(w, slot, 0.0)
            else:
                _store(w, slot, -(z_new - math.copysign(l1, z_new)) / ((beta + math.sqrt(n_new)) / alpha + l2))


@njit("boolean(int32[:, ::1], int64)", cache=True, nogil=True)
def slots_within(indices, n_features):
    """Whether every slot of ``indices`` is in ``[0, n_features)``: the learners' check before a kernel
    writes, in one pass (no early exit: the comparisons vectorize)."""
    outside = 0
    for row in range(indices.shape[0]):
        for col in range(indices.shape[1]):
            slot = indices[row, col]
            outside += (slot < 0) | (slot >= n_features)
    return outside == 0


@njit([f"void({w}[::1], int32[:, ::1], float64[:, ::1], float64[::1])" for w in ("float64", "float32", "int16")],
      cache=True, nogil=True)
def predict(w, indices, values, out):
    """P(y=True) of each row at the current weights (no update)."""
    for row in range(indices.shape[0]):
        out[row] = _predict_row(w, indices, values, row)


__all__ = ["sgd_learn", "adam_learn", "ftrl_learn", "predict", "seed", "slots_within", "Q_SCALE"]


@njit("void(float64[:, ::1], float64[:, ::1], float64[::1], float64[::1], float64[::1], float64[::1], float64, "
      "float64, float64)", cache=True, nogil=True)
def pairwise_adagrad(positives, negatives, weights, squares, own, own_squares, rate, own_rate, l2):
    """One AdaGrad step of ``online.ranking.PairwiseRanker`` on the pairwise logistic loss: the mean gradient over
    every (positive, negative) pair at the weights ``weights + own``, then a step on the global and the
    merchant's weights. The numpy step in ``tests/recs_reference.py`` is the reference (same order of sums)."""
    n_features = weights.shape[0]
    at = weights + own
    gradient = np.zeros(n_features)
    diff = np.empty(n_features)
    for i in range(positives.shape[0]):
        for j in range(negatives.shape[0]):
            margin = 0.0
            for f in range(n_features):
                diff[f] = positives[i, f] - negatives[j, f]
                margin += diff[f] * at[f]
            scale = 1.0 / (1.0 + math.exp(min(max(margin, -CLIP), CLIP)))
            for f in range(n_features):
                gradient[f] += diff[f] * scale
    pairs = positives.shape[0] * negatives.shape[0]
    for f in range(n_features):
        gradient[f] = -(gradient[f] / pairs)
    for target, sums, step in ((weights, squares, rate), (own, own_squares, own_rate)):
        for f in range(n_features):
            g = gradient[f] + l2 * target[f]
            sums[f] += g * g
            target[f] -= step * g / math.sqrt(sums[f])
