"""16-bit q2.13 weights (McMahan et al. 2013, 4.4): randomized rounding, seeded, within tolerance of float64."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from online.learners import AdamClassifier, FTRLProximalClassifier, SGDClassifier
from online.prequential import mean_logloss
from tests.test_online_kernels import PARAMS, learn_in_batches, random_stream

BYTES = {SGDClassifier: 2, AdamClassifier: 10, FTRLProximalClassifier: 10}


@pytest.mark.parametrize("cls", list(PARAMS))
@pytest.mark.parametrize("native", [True, False])
def test_q213_learns_within_tolerance_of_float64(cls, native):
    indices, values, labels = random_stream(3, rows=1500)
    exact = cls(bits=6, **PARAMS[cls])
    q = cls(bits=6, dtype="q2.13", native=native, seed=4, **PARAMS[cls])
    p_exact = learn_in_batches(exact, indices, values, labels, 128)
    p_q = learn_in_batches(q, indices, values, labels, 128)
    assert q.w.dtype == np.int16 and q.state_bytes_per_slot == BYTES[cls]
    assert np.max(np.abs(p_q - p_exact)) < 0.02
    assert abs(mean_logloss(labels, p_q) / mean_logloss(labels, p_exact) - 1) < 0.005
    np.testing.assert_allclose(q.weights, np.clip(exact.weights, -4, 4), atol=0.01)


@pytest.mark.parametrize("native", [True, False])
def test_q213_is_reproducible_from_its_seed(native):
    indices, values, labels = random_stream(1)
    runs = []
    for seed in (5, 5, 6):
        model = FTRLProximalClassifier(bits=6, dtype="q2.13", native=native, seed=seed,
                                       **PARAMS[FTRLProximalClassifier])
        learn_in_batches(model, indices, values, labels, 50)
        runs.append(model.w.copy())
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_randomized_rounding_is_unbiased_and_saturates():
    model = SGDClassifier(bits=16, dtype="q2.13", seed=1)
    target = np.full(model.n_features, 0.3 / 8192)  # 0.3 of a quantum: nearest rounding would give 0 everywhere
    model.set_weights(target)
    assert set(np.unique(model.w).tolist()) == {0, 1}
    assert abs(model.weights.mean() * 8192 - 0.3) < 0.01
    model.set_weights(np.array([-9.0, 9.0] * (model.n_features // 2)))
    assert model.weights.min() == -4.0 and model.weights.max() == 32767 / 8192


def test_q213_state_round_trips():
    indices, values, labels = random_stream(2)
    model = AdamClassifier(bits=6, dtype="q2.13", seed=3, **PARAMS[AdamClassifier])
    learn_in_batches(model, indices, values, labels, 64)
    for restored in (AdamClassifier.from_state(model.state()), pickle.loads(pickle.dumps(model))):
        assert restored.w.dtype == np.int16 and restored.m.dtype == np.float32
        assert np.array_equal(restored.w, model.w)
        np.testing.assert_array_equal(restored.predict_proba_many(indices, values),
                                      model.predict_proba_many(indices, values))
    assert model.predict_proba_one({0: 1.0, 5: 2.0})[True] == pytest.approx(
        float(model.predict_proba_many(np.array([[0, 5]]), np.array([[1.0, 2.0]]))[0]), rel=1e-12)


def test_state_dtype_setting_reaches_our_learners_and_a_param_wins(monkeypatch):
    from fedstream.settings import OnlineSettings, load_settings
    from online.commands import learner_params
    from online.learners import DTYPES

    assert OnlineSettings.model_fields["state_dtype"].annotation.__args__ == DTYPES
    monkeypatch.setenv("FEDSTREAM_ONLINE__STATE_DTYPE", "q2.13")
    settings = load_settings()
    assert learner_params(settings, "ftrl", {"alpha": 0.1}) == {"alpha": 0.1, "dtype": "q2.13"}
    assert learner_params(settings, "sgd", {"dtype": "float32"}) == {"dtype": "float32"}
    assert learner_params(settings, "river-ftrl", {}) == {}
