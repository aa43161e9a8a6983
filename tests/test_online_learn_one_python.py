"""``learn_one``'s Python path for small dicts against the kernel path it replaces, bit for bit.

The reference is what ``learn_one`` did before (and still does for large rows): the dict as one
``(1, k)`` kernel row through ``learn_many``. Streams are hostile: string, int, bool, float and numpy keys,
slot collisions (small hash spaces), zero, negative-zero, tiny, huge, NaN and infinite values, numpy
scalar values, empty dicts, repeated layouts interleaved with fresh ones, and the per-slot arrays replaced
mid-stream (unpickled, restored from state, reassigned).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from online import learners
from online.learners import LEARNERS, SMALL_ROW

PARAMS = {"sgd": {"learning_rate": 0.3, "l2": 0.01}, "adam": {"learning_rate": 0.05},
          "ftrl": {"alpha": 0.3, "beta": 1.0, "l1": 0.2, "l2": 0.5}}


def reference_learn_one(model, x: dict, y: bool) -> None:
    """The kernel path: ``learn_one`` as it was (the kernel merges colliding slots)."""
    indices, values = model._native_row(x)
    model.learn_many(indices, values, np.array([bool(y)]))


def hostile_value(rng: np.random.Generator, non_finite: float):
    if rng.random() < non_finite:
        return float(rng.choice([np.nan, np.inf, -np.inf, 1e200, -1e300]))
    kind = rng.integers(0, 24)
    if kind == 0:
        return 0.0
    if kind == 1:
        return -0.0
    if kind == 2:
        return float(rng.choice([1e3, -4e2, 1e-3]))
    if kind == 3:
        return float(rng.choice([5e-324, -1e-310, 2.2250738585072014e-308]))
    if kind == 4:
        return int(rng.integers(-3, 4))
    if kind == 5:
        return np.float32(rng.normal())
    if kind == 6:
        return bool(rng.integers(0, 2))
    return float(rng.normal(0.5, 2.0))


def hostile_key(rng: np.random.Generator):
    kind = rng.integers(0, 10)
    if kind == 0:
        return int(rng.integers(-100, 100))
    if kind == 1:
        return bool(rng.integers(0, 2))
    if kind == 2:
        return float(rng.integers(0, 3)) / 2
    if kind == 3:
        return np.int64(rng.integers(0, 50))
    return f"f{rng.integers(0, 60)}"


def hostile_stream(seed: int, rows: int = 700, non_finite: float = 0.0):
    """Dicts of 0..SMALL_ROW+3 keys; about half of the rows come in runs of one string layout (dense
    data), the rest mix key types. ``non_finite``: the share of values that are NaN, infinite or overflow
    a weight."""
    rng = np.random.default_rng(seed)
    layouts = [[f"d{k}" for k in range(width)] + ["bias"] for width in (2, 9, 15)]
    layouts.append(["d0", "bias", "d1"])  # the keys of another layout, in another order
    produced = 0
    while produced < rows:
        if rng.random() < 0.12:
            keys = layouts[rng.integers(0, len(layouts))]
            for _ in range(rng.integers(1, 16)):
                x = {key: float(rng.normal(0.0, 1.5)) for key in keys}
                if rng.random() < 10 * non_finite:
                    x[keys[0]] = float(rng.choice([np.nan, np.inf]))
                produced += 1
                yield x, bool(rng.random() < 0.4)
        else:
            x = {hostile_key(rng): hostile_value(rng, non_finite) for _ in range(rng.integers(0, SMALL_ROW + 4))}
            produced += 1
            yield x, bool(rng.random() < 0.4)


def python_rows_expected(stream, mask: int) -> list[bool]:
    """Which rows ``learn_one`` learns in Python, from its rule written out: a row with the keys of the
    small row before (same order; wide rows are skipped), 1..SMALL_ROW of them, all strings, slots distinct
    (and a finite logit)."""
    last, out = None, []
    for x, _ in stream:
        keys = tuple(x)
        slots = [learners.hash_key(key, mask) for key in keys]
        out.append(keys == last and 0 < len(keys) <= SMALL_ROW and all(type(key) is str for key in keys)
                   and len(set(slots)) == len(slots))
        if len(keys) <= SMALL_ROW:
            last = keys
    return out


def assert_bitwise_equal(a, b) -> None:
    for name in a._arrays:
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype
        assert np.array_equal(left.view(f"u{left.itemsize}"), right.view(f"u{right.itemsize}")), name
    assert (a.n_updates, a.n_batches) == (b.n_updates, b.n_batches)


def learn_both(name: str, dtype: str, seed: int, bits: int, monkeypatch, non_finite: float = 0.0) -> tuple[int, int]:
    """Ours and the reference over one hostile stream, compared after every row; how many rows ours sent
    to its kernel, and how many the rule sends there (rows with non-finite logits aside)."""
    cls, kernel_calls = LEARNERS[name], []
    kernel = cls._learn_native
    monkeypatch.setattr(cls, "_learn_native", lambda *args: kernel_calls.append(1) or kernel(*args))
    ours, reference = cls(bits=bits, dtype=dtype, **PARAMS[name]), cls(bits=bits, dtype=dtype, **PARAMS[name])
    stream = list(hostile_stream(seed, non_finite=non_finite))
    python_rows = python_rows_expected(stream, ours._mask)
    for row, (x, y) in enumerate(stream):
        if row % 150 == 149:  # every 150 rows the arrays become new objects (unpickled, restored, reassigned)
            how = row // 150 % 3
            ours = [pickle.loads(pickle.dumps(ours)), type(ours).from_state(ours.state()), ours][how]
            setattr(ours, ours._arrays[-1], getattr(ours, ours._arrays[-1]).copy())
            python_rows[row] = python_rows[row] and how == 2  # a new learner starts without a layout memo
        p_ours, p_reference = ours.predict_proba_one(x)[True], reference.predict_proba_one(x)[True]
        assert p_ours == p_reference or (p_ours != p_ours and p_reference != p_reference), row
        ours.learn_one(x, y)
        reference_learn_one(reference, x, y)
        assert_bitwise_equal(ours, reference)
    return len(kernel_calls) - len(stream), len(stream) - sum(python_rows)


@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("seed,bits", [(0, 4), (1, 7), (2, 20)])
def test_small_dicts_learn_bit_for_bit_as_the_kernel(name, dtype, seed, bits, monkeypatch):
    kernel_rows, expected = learn_both(name, dtype, seed, bits, monkeypatch)
    assert kernel_rows == expected < 600  # of 700 rows


@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_non_finite_values_and_overflowing_weights_learn_as_the_kernel(name, dtype, monkeypatch):
    """A NaN or infinite value, or a weight that overflowed, makes a row's logit non-finite: the kernel
    learns that row (a NaN value is skipped by its update), and every later row whose weights it poisoned."""
    kernel_rows, expected = learn_both(name, dtype, 3, 20, monkeypatch, non_finite=0.004)
    assert kernel_rows > expected


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_python_path_takes_repeated_small_layouts_and_leaves_the_rest_to_the_kernel(name, monkeypatch):
    """Rows with the keys of the row before go through Python; a first layout, colliding slots, a
    non-finite logit, a wide row and keys other than strings reach the kernel."""
    calls = []
    model = LEARNERS[name](bits=3, **PARAMS[name])
    real = model._learn_native
    monkeypatch.setattr(model, "_learn_native", lambda *args: calls.append(1) or real(*args))
    dense = {"a": 1.0, "c": 0.5, "bias": 1.0}
    assert len({learners.hash_key(key, 7) for key in dense}) == 3
    for y in (True, False, True):
        model.learn_one(dense, y)
    assert len(calls) == 1
    colliding = {"a": 1.0, "g": 2.0}
    assert learners.hash_key("a", 7) == learners.hash_key("g", 7)
    for x in (colliding, colliding, {**dense, "a": float("nan")}, {k: 1.0 for k in "abcdefghijklmnopq"}, {1: 1.0}, {1: 1.0}):
        model.learn_one(x, True)
    assert len(calls) == 7 and model.n_updates == 9


def test_the_remembered_layout_keeps_string_keys_only():
    """Equal keys of other types hash elsewhere (``1 == True == 1.0``): a layout's slots are taken from
    strings only, and the memo then holds the string keys."""
    model = learners.SGDClassifier(bits=12, learning_rate=0.5)
    for keys in ((1, "bias"), (True, "bias"), (1.0, "bias")):
        model.learn_one(dict.fromkeys(keys, 1.0), True)
        assert model.__dict__["_scratch_layout"] in ((keys, False), ((1, "bias"), None))
    for keys in (("1", "bias"), ("1", "bias")):
        model.learn_one(dict.fromkeys(keys, 1.0), True)
    assert model.__dict__["_scratch_layout"] == (("1", "bias"), [learners.hash_key(k, 4095) for k in ("1", "bias")])


def test_scratch_views_are_not_pickled():
    model = learners.FTRLProximalClassifier(bits=6)
    model.learn_one({"a": 1.0}, True)
    model.learn_one({"a": 1.0}, False)
    assert "_scratch_views" in model.__dict__ and "_scratch_layout" in model.__dict__
    restored = pickle.loads(pickle.dumps(model))
    assert not any(key.startswith("_scratch") for key in restored.__dict__)
    assert_bitwise_equal(restored, model)
