"""Online learners: each update against its textbook formula, against River's optimizers, protocols, state."""

from __future__ import annotations

import doctest
import math
import pickle

import numpy as np
import pytest

from online import learners, prequential, reco, river_models
from online.learners import AdamClassifier, FTRLProximalClassifier, SGDClassifier
from online.river_models import MODEL_NAMES, make_model


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


@pytest.mark.parametrize("module", [learners, river_models, reco, prequential])
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


def test_sgd_step_matches_formula():
    model = SGDClassifier(bits=4, learning_rate=0.3, l2=0.1)
    model.w[1], model.w[2] = 0.2, -0.4
    x = {1: 1.0, 2: 0.5}
    p = sig(0.2 * 1.0 - 0.4 * 0.5)
    model.learn_one(x, True)
    assert model.w[1] == pytest.approx(0.2 - 0.3 * ((p - 1) * 1.0 + 0.1 * 0.2))
    assert model.w[2] == pytest.approx(-0.4 - 0.3 * ((p - 1) * 0.5 + 0.1 * -0.4))
    assert model.n_updates == 1 and np.count_nonzero(model.w) == 2


def test_adam_two_steps_with_bias_correction():
    lr, b1, b2, eps = 0.05, 0.9, 0.999, 1e-8
    model = AdamClassifier(bits=4, learning_rate=lr, beta_1=b1, beta_2=b2, eps=eps)
    w = m = v = 0.0
    for t, y in enumerate([True, False], start=1):
        g = sig(w * 2.0) - float(y)
        g *= 2.0  # x = {3: 2.0}
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        w_expected = w - lr * m_hat / (math.sqrt(v_hat) + eps / math.sqrt(1 - b2**t))  # ε on the raw √v (River, TF)
        model.learn_one({3: 2.0}, y)
        w = w_expected
        assert model.w[3] == pytest.approx(w, rel=1e-9)
        assert model.m[3] == pytest.approx(m) and model.v[3] == pytest.approx(v)
    assert model.t == 2
    # lazy: untouched slots keep zero moments
    assert np.count_nonzero(model.m) == 1


def test_ftrl_matches_algorithm_1_closed_form_and_l1_sparsity():
    alpha, beta, l1, l2 = 0.1, 1.0, 0.3, 0.5
    model = FTRLProximalClassifier(bits=4, alpha=alpha, beta=beta, l1=l1, l2=l2)
    z = n = w = 0.0
    for y in [True, True, True, False]:
        p = sig(w)
        g = p - float(y)
        sigma = (math.sqrt(n + g * g) - math.sqrt(n)) / alpha
        z += g - sigma * w
        n += g * g
        w = 0.0 if abs(z) <= l1 else -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n)) / alpha + l2)
        model.learn_one({5: 1.0}, y)
        assert model.z[5] == pytest.approx(z) and model.n[5] == pytest.approx(n) and model.w[5] == pytest.approx(w)
    # first step: |z| = 0.5 > l1 so w != 0; a slot seen once with a small gradient stays exactly 0 (L1)
    sparse = FTRLProximalClassifier(bits=4, alpha=alpha, l1=1.0)
    sparse.learn_one({7: 1.0}, True)
    assert sparse.z[7] == pytest.approx(-0.5) and sparse.w[7] == 0.0
    assert sparse.predict_proba_one({7: 1.0})[True] == pytest.approx(0.5)


def test_learn_many_with_one_row_is_learn_one_and_duplicates_are_summed():
    for cls in (SGDClassifier, AdamClassifier, FTRLProximalClassifier):
        a, b = cls(bits=6), cls(bits=6)
        rows = np.array([[1, 2, 2, 9]], dtype=np.int32)  # slot 2 collides inside the row
        vals = np.ones((1, 4), dtype=np.float32)
        for y in (True, False, True):
            b.learn_many(rows, vals, np.array([y]))
            a.learn_one({1: 1.0, 2: 2.0, 9: 1.0}, y)
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-12, atol=1e-15)


def test_ftrl_mini_batch_is_one_delayed_algorithm_1_step_per_slot():
    """Rows' gradients (at the batch-start w) are summed per slot, their squares summed into n."""
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 16, size=(8, 3)).astype(np.int32)
    indices[:, 0] = 0  # shared bias slot
    values = rng.random((8, 3)).astype(np.float32) + 0.5
    y = rng.random(8) < 0.4
    model = FTRLProximalClassifier(bits=4, alpha=0.2, l1=0.01, l2=0.1, max_delay=64)  # the delayed path
    model.learn_many(indices[:4], values[:4], y[:4])
    z0, n0, w0 = model.z.copy(), model.n.copy(), model.w.copy()
    model.learn_many(indices[4:], values[4:], y[4:])
    total, squares = np.zeros(16), np.zeros(16)
    for row in range(4, 8):
        x: dict[int, float] = {}
        for i, v in zip(indices[row].tolist(), values[row].astype(np.float64).tolist()):
            x[i] = x.get(i, 0.0) + v
        p = sig(sum(w0[i] * v for i, v in x.items()))
        for i, v in x.items():
            total[i] += (p - y[row]) * v
            squares[i] += ((p - y[row]) * v) ** 2
    touched = squares > 0
    sigma = (np.sqrt(n0 + squares) - np.sqrt(n0)) / 0.2
    z = np.where(touched, z0 + total - sigma * w0, z0)
    n = n0 + squares
    np.testing.assert_allclose(model.z, z, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.n, n, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.w, np.where(touched, model.closed_form(z, n), w0), rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def stream():
    """A small seeded click stream, featurized once: (indices, values, labels, River dicts)."""
    from streams.features import FeatureContext, Featurizer, as_dict
    from streams.generator import GeneratorConfig, generate
    from streams.schemas import Click

    featurizer, context = Featurizer(14), FeatureContext()
    rows, labels = [], []
    for event in generate(GeneratorConfig(merchants=3, events=3000, seed=11)):
        if isinstance(event, Click):
            rows.append(featurizer.transform(event, context)[0])
            labels.append(event.clicked)
        context.observe(event)
    indices = np.array(rows)
    values = np.ones(indices.shape, dtype=np.float32)
    return indices, values, np.array(labels), [as_dict(i, v) for i, v in zip(indices, values)]


def _progressive_logloss(model, dicts, labels) -> float:
    losses = []
    for x, y in zip(dicts, labels):
        p = min(max(model.predict_proba_one(x)[True], 1e-15), 1 - 1e-15)
        losses.append(-math.log(p if y else 1 - p))
        model.learn_one(x, bool(y))
    return float(np.mean(losses))


@pytest.mark.parametrize("name,river_name,params", [
    ("sgd", "river-sgd", {"learning_rate": 0.05}),
    ("adam", "river-adam", {"learning_rate": 0.005}),
    ("ftrl", "river-ftrl", {"alpha": 0.1, "beta": 1.0, "l1": 0.0, "l2": 1.0}),
])
def test_same_stream_logloss_as_river(stream, name, river_name, params):
    _, _, labels, dicts = stream
    ours = _progressive_logloss(make_model(name, 14, **params), dicts, labels)
    theirs = _progressive_logloss(make_model(river_name, 14, **params), dicts, labels)
    # River's LogisticRegression runs Adam densely (moments of absent slots decay too) and FTRL with
    # weights one step stale; ours are lazy Adam and Algorithm 1, so "close" means: never more than 3% worse
    assert ours <= theirs * 1.03
    assert ours < 0.54  # it learns: a constant click-rate predictor scores 0.561 on this stream


def test_sgd_is_identical_to_river_sgd(stream):
    _, _, labels, dicts = stream
    ours, theirs = make_model("sgd", 14, learning_rate=0.05), make_model("river-sgd", 14, learning_rate=0.05)
    for x, y in zip(dicts[:300], labels[:300]):
        assert ours.predict_proba_one(x)[True] == pytest.approx(theirs.predict_proba_one(x)[True], abs=1e-12)
        ours.learn_one(x, y)
        theirs.learn_one(x, y)


def test_mini_batches_stay_close_to_one_at_a_time(stream):
    indices, values, labels, dicts = stream
    for name in ("ftrl", "adam", "sgd"):
        params = {"adam": {"learning_rate": 0.005}, "sgd": {"learning_rate": 0.05}}.get(name, {})
        one = _progressive_logloss(make_model(name, 14, **params), dicts, labels)
        for batch in (32, 1024):  # chunks of max_delay rows: the batch size the caller picks hardly matters
            model = make_model(name, 14, **params)
            p = np.concatenate([model.learn_many(indices[s:s + batch], values[s:s + batch], labels[s:s + batch])
                                for s in range(0, len(labels), batch)])
            batched = float(prequential.logloss(labels.astype(float), p).mean())
            limit = 1.08 if name == "adam" else 1.03  # Adam takes 16x fewer steps (one per 16-row chunk)
            assert batched < one * limit, (name, batch, batched, one)


def test_river_protocol_progressive_val_score_and_pipelines(stream):
    from river import compose, evaluate, metrics

    _, _, labels, dicts = stream
    model = FTRLProximalClassifier(bits=14)
    metric = evaluate.progressive_val_score(list(zip(dicts[:500], labels[:500].tolist())), model, metrics.LogLoss())
    assert 0.2 < metric.get() < 0.7
    assert model.n_updates == 500
    # named (string) features are hashed into the same space inside a River pipeline
    pipeline = compose.FuncTransformer(lambda x: {f"f{k}": v for k, v in x.items()}) | AdamClassifier(bits=10)
    pipeline.learn_one(dicts[0], True)
    assert 0 < pipeline.predict_proba_one(dicts[0])[True] < 1
    assert model.clone().n_updates == 0


def test_state_roundtrip_and_pickle(stream):
    indices, values, labels, _ = stream
    for cls in (SGDClassifier, AdamClassifier, FTRLProximalClassifier):
        model = cls(bits=14)
        model.learn_many(indices[:200], values[:200], labels[:200])
        restored = cls.from_state(model.state())
        np.testing.assert_array_equal(restored.weights, model.weights)
        clone = pickle.loads(pickle.dumps(model))
        np.testing.assert_array_equal(clone.predict_proba_many(indices[200:300], values[200:300]),
                                      model.predict_proba_many(indices[200:300], values[200:300]))
        assert restored.n_updates == clone.n_updates == 200
    with pytest.raises(ValueError):
        SGDClassifier.from_state(FTRLProximalClassifier(bits=4).state())


def test_memory_is_bounded_by_hash_space(stream):
    indices, values, labels, _ = stream
    model = FTRLProximalClassifier(bits=10)
    sizes = {name: getattr(model, name).nbytes for name in model._arrays}
    for _ in range(3):
        model.learn_many(indices % 1024, values, labels)
    assert {name: getattr(model, name).nbytes for name in model._arrays} == sizes == {k: 8 * 1024 for k in sizes}


def test_bad_inputs_are_rejected():
    model = FTRLProximalClassifier(bits=4)
    with pytest.raises(ValueError):
        model.learn_many(np.array([[16]]), np.ones((1, 1)), [True])  # slot outside 2**bits
    with pytest.raises(ValueError):
        model.learn_many(np.array([[1, 2]]), np.ones((1, 3)), [True])  # shape mismatch
    with pytest.raises(ValueError):
        model.learn_many(np.array([[1]]), np.ones((1, 1)), [True, False])  # label count
    with pytest.raises(TypeError):
        model.predict_proba_many(np.array([[1.5]]), np.ones((1, 1)))
    with pytest.raises(ValueError):
        FTRLProximalClassifier(bits=4, alpha=0)
    with pytest.raises(ValueError):
        make_model("nope", 8)
    assert model.learn_many(np.empty((0, 3), np.int32), np.empty((0, 3)), []).shape == (0,)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_factory_model_speaks_the_batch_protocol(stream, name):
    indices, values, labels, _ = stream
    model = make_model(name, 14)
    before = model.learn_many(indices[:64], values[:64], labels[:64])
    after = model.predict_proba_many(indices[:64], values[:64])
    assert before.shape == after.shape == (64,)
    assert np.all((after >= 0) & (after <= 1)) and not np.allclose(before, after)
