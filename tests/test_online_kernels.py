"""Native kernels against the numpy reference, value for value; exact mini-batches == learn_one loops."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from online.learners import AdamClassifier, FTRLProximalClassifier, SGDClassifier

PARAMS = {
    SGDClassifier: {"learning_rate": 0.2, "l2": 0.01},
    AdamClassifier: {"learning_rate": 0.05},
    FTRLProximalClassifier: {"alpha": 0.3, "beta": 1.0, "l1": 0.2, "l2": 0.5},
}


def random_stream(seed: int, rows: int = 600, width: int = 7, bits: int = 6):
    """Rows with a shared bias slot, in-row slot collisions (small hash space) and non-unit values."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, 1 << bits, size=(rows, width)).astype(np.int32)
    indices[:, 0] = 0
    values = rng.normal(1.0, 0.7, size=(rows, width))
    values[rng.random((rows, width)) < 0.05] = 0.0  # explicit zeros are still "present" features
    labels = rng.random(rows) < 0.3 + 0.4 * (indices[:, 1] % 2)
    return indices, values, labels


def learn_in_batches(model, indices, values, labels, batch: int) -> np.ndarray:
    return np.concatenate([model.learn_many(indices[s:s + batch], values[s:s + batch], labels[s:s + batch])
                           for s in range(0, len(labels), batch)])


def assert_same_state(a, b, rtol: float) -> None:
    for name in a._arrays:
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=rtol * 1e-3, err_msg=name)
    assert (a.n_updates, a.n_batches) == (b.n_updates, b.n_batches)


@pytest.mark.parametrize("cls", list(PARAMS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_equals_numpy_reference(cls, seed):
    indices, values, labels = random_stream(seed)
    native = cls(bits=6, native=True, **PARAMS[cls])
    reference = cls(bits=6, native=False, **PARAMS[cls])
    p_native = learn_in_batches(native, indices, values, labels, batch=97)
    p_reference = learn_in_batches(reference, indices, values, labels, batch=97)
    np.testing.assert_allclose(p_native, p_reference, rtol=1e-12, atol=1e-14)
    assert_same_state(native, reference, rtol=1e-12)
    np.testing.assert_allclose(native.predict_proba_many(indices, values),
                               reference.predict_proba_many(indices, values), rtol=1e-12)


@pytest.mark.parametrize("cls", list(PARAMS))
def test_native_float32_state_equals_numpy_reference(cls):
    indices, values, labels = random_stream(5)
    native = cls(bits=6, dtype="float32", **PARAMS[cls])
    reference = cls(bits=6, dtype="float32", native=False, **PARAMS[cls])
    np.testing.assert_allclose(learn_in_batches(native, indices, values, labels, 64),
                               learn_in_batches(reference, indices, values, labels, 64), rtol=1e-5)
    assert native.w.dtype == np.float32 and native.state_bytes_per_slot == 4 * len(cls._arrays)
    assert_same_state(native, reference, rtol=1e-4)


@pytest.mark.parametrize("cls", list(PARAMS))
def test_exact_mini_batches_are_a_learn_one_loop(cls):
    indices, values, labels = random_stream(3, bits=8)
    batched = cls(bits=8, **PARAMS[cls])
    p_batched = learn_in_batches(batched, indices, values, labels, batch=256)
    one = cls(bits=8, **PARAMS[cls])
    p_one = np.empty(len(labels))
    for row, (i, v, y) in enumerate(zip(indices.tolist(), values.tolist(), labels.tolist())):
        x: dict[int, float] = {}
        for slot, value in zip(i, v):
            x[slot] = x.get(slot, 0.0) + value  # a dict cannot repeat a key: collisions summed, as the kernels do
        p_one[row] = one.predict_proba_one(x)[True]
        one.learn_one(x, y)
    np.testing.assert_allclose(p_batched, p_one, rtol=1e-12, atol=1e-14)
    assert_same_state(batched, one, rtol=1e-12)


def test_named_keys_hash_like_the_reference():
    """String (memoized), bool and float keys land in the slots the numpy path hashes them to."""
    native, reference = FTRLProximalClassifier(bits=5), FTRLProximalClassifier(bits=5, native=False)
    rng = np.random.default_rng(9)
    for step in range(300):
        x = {f"f{k}": float(rng.normal()) for k in rng.choice(40, size=6, replace=False)}
        x.update({True: 1.0, 2.5: 0.5, int(rng.integers(0, 99)): 1.0})
        y = bool(rng.random() < 0.4)
        assert native.predict_proba_one(x)[True] == pytest.approx(reference.predict_proba_one(x)[True], rel=1e-12)
        native.learn_one(x, y)
        reference.learn_one(x, y)
    assert_same_state(native, reference, rtol=1e-12)


def test_checkpoints_from_before_the_kernels_keep_their_delayed_path():
    """A pickle without ``native``/``dtype`` (older worker checkpoints, registered bundles) loads and
    keeps learning in delayed chunks of its own ``max_delay``."""
    indices, values, labels = random_stream(4, bits=8)
    old = FTRLProximalClassifier(bits=8, max_delay=64)
    old.learn_many(indices[:300], values[:300], labels[:300])
    state = old.__getstate__()
    for key in ("native", "dtype"):
        state.pop(key)
    restored = FTRLProximalClassifier.__new__(FTRLProximalClassifier)
    restored.__setstate__(pickle.loads(pickle.dumps(state)))
    assert restored.native and restored.dtype == "float64" and not restored.exact
    expected = old.learn_many(indices[300:], values[300:], labels[300:])
    np.testing.assert_array_equal(restored.learn_many(indices[300:], values[300:], labels[300:]), expected)
    np.testing.assert_array_equal(restored.weights, old.weights)


def test_float32_and_bad_options_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        SGDClassifier(bits=4, dtype="float16")
    with pytest.raises(ValueError, match="max_delay"):
        AdamClassifier(bits=4, max_delay=0)
    model = FTRLProximalClassifier(bits=4, dtype="float32")
    restored = FTRLProximalClassifier.from_state(model.state())
    assert restored.z.dtype == np.float32 and FTRLProximalClassifier(bits=4).state_bytes_per_slot == 24


def test_exact_ftrl_matches_vowpal_wabbit_ftrl():
    """VW 9.11.9's FTRL (same slots, alpha/beta/l1/l2, no constant) and our exact FTRL: same progressive
    log loss and predictions (VW keeps float32 weights, hence the tolerance). Rows repeat no slot: VW
    updates a repeated feature twice, we merge it into one (as learn_one on a dict)."""
    from benchmarks import _online_peers as peers
    from online.prequential import mean_logloss

    rng = np.random.default_rng(21)
    indices = (np.arange(6) * 4096 + rng.integers(0, 4096, size=(3000, 6))).astype(np.int32)  # column c in its own range
    indices[:, 0] = 7  # a bias slot every row carries
    indices[:, 1] = 4096 + rng.integers(0, 4, size=3000)  # the informative field: 4 values
    logit = 2.0 * (indices[:, 1] % 2) - 1.5
    labels = (rng.random(3000) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    values = np.ones(indices.shape)
    ftrl = {"alpha": 0.2, "beta": 1.0, "l1": 0.1, "l2": 1.0}
    vw = peers.run_vw(indices, values, labels, bits=15, ftrl=ftrl, repeats=1)
    ours = FTRLProximalClassifier(bits=15, **ftrl)
    p = learn_in_batches(ours, indices, values, labels, batch=500)
    assert mean_logloss(labels, p) == pytest.approx(vw["logloss"], abs=1e-6)
    np.testing.assert_allclose(p, vw["p"], atol=1e-5)
    assert mean_logloss(labels, p) < mean_logloss(labels, np.full(len(labels), labels.mean()))  # it learns
