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
    """Dicts of 0..SMALL_ROW+3 keys; a third of them repeat one of a few string layouts (dense data).
    ``non_finite``: the share of values that are NaN, infinite or overflow a weight."""
    rng = np.random.default_rng(seed)
    layouts = [[f"d{k}" for k in range(width)] + ["bias"] for width in (2, 9, 15)]
    for _ in range(rows):
        if rng.random() < 0.35:
            keys = layouts[rng.integers(0, len(layouts))]
            x = {key: float(rng.normal(0.0, 1.5)) for key in keys}
            if rng.random() < 10 * non_finite:
                x[keys[0]] = float(rng.choice([np.nan, np.inf]))
        else:
            x = {hostile_key(rng): hostile_value(rng, non_finite) for _ in range(rng.integers(0, SMALL_ROW + 4))}
        yield x, bool(rng.random() < 0.4)


def assert_bitwise_equal(a, b) -> None:
    for name in a._arrays:
        left, right = getattr(a, name), getattr(b, name)
        assert left.dtype == right.dtype
        assert np.array_equal(left.view(f"u{left.itemsize}"), right.view(f"u{right.itemsize}")), name
    assert (a.n_updates, a.n_batches) == (b.n_updates, b.n_batches)


def replace_arrays(model, step: int):
    """Every 150 rows the arrays become new objects: unpickled, restored from state, or reassigned."""
    if step % 450 == 150:
        return pickle.loads(pickle.dumps(model))
    if step % 450 == 300:
        return type(model).from_state(model.state())
    if step % 450 == 0 and step:
        setattr(model, model._arrays[-1], getattr(model, model._arrays[-1]).copy())
    return model


def learn_both(name: str, dtype: str, seed: int, bits: int, monkeypatch, non_finite: float = 0.0) -> int:
    """Ours and the reference over one hostile stream, compared after every row; how many of its rows
    ours sent to its kernel beyond the wide and the colliding ones."""
    cls, kernel_calls = LEARNERS[name], []
    kernel = cls._learn_native
    monkeypatch.setattr(cls, "_learn_native", lambda *args: kernel_calls.append(1) or kernel(*args))
    ours, reference = cls(bits=bits, dtype=dtype, **PARAMS[name]), cls(bits=bits, dtype=dtype, **PARAMS[name])
    rows = wide_or_colliding = 0
    for rows, (x, y) in enumerate(hostile_stream(seed, non_finite=non_finite), start=1):
        wide_or_colliding += len(x) > SMALL_ROW or len({learners.hash_key(key, ours._mask) for key in x}) < len(x)
        ours = replace_arrays(ours, rows)
        p_ours, p_reference = ours.predict_proba_one(x)[True], reference.predict_proba_one(x)[True]
        assert p_ours == p_reference or (p_ours != p_ours and p_reference != p_reference), rows
        ours.learn_one(x, y)
        reference_learn_one(reference, x, y)
        assert_bitwise_equal(ours, reference)
    return len(kernel_calls) - rows - wide_or_colliding


@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("seed,bits", [(0, 4), (1, 7), (2, 20)])
def test_small_dicts_learn_bit_for_bit_as_the_kernel(name, dtype, seed, bits, monkeypatch):
    assert learn_both(name, dtype, seed, bits, monkeypatch) == 0  # only the wide rows and the colliding ones


@pytest.mark.parametrize("name", sorted(LEARNERS))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_non_finite_values_and_overflowing_weights_learn_as_the_kernel(name, dtype, monkeypatch):
    """A NaN or infinite value, or a weight that overflowed, makes a row's logit non-finite: the kernel
    learns that row (a NaN value is skipped by its update), and every later row whose weights it poisoned."""
    assert learn_both(name, dtype, 3, 20, monkeypatch, non_finite=0.004) > 10


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_python_path_takes_the_small_rows_and_leaves_the_rest_to_the_kernel(name, monkeypatch):
    """Distinct finite small rows never reach the kernel; collisions, non-finite logits and wide rows do."""
    calls = []
    model = LEARNERS[name](bits=3, **PARAMS[name])
    real = model._learn_native
    monkeypatch.setattr(model, "_learn_native", lambda *args: calls.append(1) or real(*args))
    model.learn_one({"a": 1.0, 2: 0.5, "bias": 1.0}, True)
    model.learn_one({"a": 1.0, 2: 0.5, "bias": 1.0}, False)
    assert calls == []
    model.learn_one({1: 1.0, 9: 2.0}, True)  # 9 & 7 == 1: one slot twice
    model.learn_one({1: float("nan")}, True)
    model.learn_one({k: 1.0 for k in range(SMALL_ROW + 1)}, True)
    assert len(calls) == 3 and model.n_updates == 5


def test_the_remembered_layout_is_never_taken_for_other_key_types():
    """Equal keys of other types hash elsewhere (``1``, ``True``, ``1.0``): the layout memo keeps strings only."""
    model = learners.SGDClassifier(bits=12, learning_rate=0.5)
    for keys in (("1", "bias"), (1, "bias"), (True, "bias"), (1.0, "bias"), ("1", "bias")):
        x = dict.fromkeys(keys, 1.0)
        expected = [learners.hash_key(key, model._mask) for key in keys]
        assert model._small_row_slots(x) == (keys, expected, expected)
    assert model.__dict__["_scratch_layout"][0] == ("1", "bias")


def test_scratch_views_are_not_pickled():
    model = learners.FTRLProximalClassifier(bits=6)
    model.learn_one({"a": 1.0}, True)
    assert "_scratch_views" in model.__dict__ and "_scratch_layout" in model.__dict__
    restored = pickle.loads(pickle.dumps(model))
    assert not any(key.startswith("_scratch") for key in restored.__dict__)
    assert_bitwise_equal(restored, model)
