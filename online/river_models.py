"""River models behind the same interface as :mod:`online.learners`, and the one model factory.

Every model returned by :func:`make_model` has ``learn_one``/``predict_proba_one`` (River's protocol)
and ``learn_many(indices, values, y) -> p_before`` / ``predict_proba_many(indices, values) -> float[n]``
on the featurizer's ``(n, F)`` arrays, so the worker, the benchmarks and the registry treat ours and
River's the same. River models see each row as ``streams.features.as_dict`` (``{slot: value}``).

* :class:`RiverClassifier` wraps any River binary classifier (``LogisticRegression`` with River's own
  optimizers, ``facto.FMClassifier``...): rows are learned one by one, in order (River has no sparse
  mini-batch path), test-then-train inside the batch.
* :class:`RiverRanker` wraps River's ``reco`` models (``BiasedMF``, ``FunkMF``, ``Baseline``), which
  score (user, item) pairs: the user and item come from the ``user`` and ``item`` hashed slots of the
  row, the model is trained on the log loss and its raw score goes through a sigmoid.

Example:
    >>> import numpy as np
    >>> model = make_model("river-ftrl", bits=8)
    >>> indices, values = np.array([[1, 2], [1, 3]], dtype=np.int32), np.ones((2, 2), dtype=np.float32)
    >>> model.learn_many(indices, values, np.array([True, False])).round(2).tolist()
    [0.5, 0.5]
    >>> sorted(MODEL_NAMES)[:4]
    ['adam', 'ftrl', 'river-adam', 'river-baseline']
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from online.learners import LEARNERS, CLIP, HashedLogisticRegression, sigmoid
from streams.features import FIELDS, as_dict

USER_FIELD, ITEM_FIELD = FIELDS.index("user"), FIELDS.index("item")


class RiverClassifier:
    """A River binary classifier learning from hashed rows; ``model`` is the River estimator itself."""

    def __init__(self, model: Any, bits: int, name: str = "river") -> None:
        self.model = model
        self.bits = bits
        self.name = name
        self.n_updates = 0

    def predict_proba_one(self, x: dict) -> dict[bool, float]:
        p = float(self.model.predict_proba_one(x).get(True, 0.5))
        return {False: 1.0 - p, True: p}

    def learn_one(self, x: dict, y: bool) -> None:
        self.model.learn_one(x, bool(y))
        self.n_updates += 1

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        return np.array([self.predict_proba_one(as_dict(i, v))[True] for i, v in zip(indices, values)], dtype=np.float64)

    def learn_many(self, indices: np.ndarray, values: np.ndarray, y: Any) -> np.ndarray:
        """Test-then-train row by row; returns each row's probability before it was learned."""
        labels = np.asarray(y, dtype=bool).reshape(-1)
        if labels.shape[0] != len(indices):
            raise ValueError(f"{len(indices)} rows but {labels.shape[0]} labels")
        out = np.empty(len(labels), dtype=np.float64)
        for row, (i, v, label) in enumerate(zip(indices, values, labels.tolist())):
            x = as_dict(i, v)
            out[row] = self.predict_proba_one(x)[True]
            self.learn_one(x, label)
        return out

    def __repr__(self) -> str:
        return f"RiverClassifier({self.model!r})"


class RiverRanker(RiverClassifier):
    """A River ``reco`` model (user, item -> score) as a click classifier on the hashed user/item slots."""

    def _pair(self, indices: np.ndarray) -> tuple[int, int]:
        return int(indices[USER_FIELD]), int(indices[ITEM_FIELD])

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        scores = [self.model.predict_one(*self._pair(row)) for row in indices]
        return sigmoid(np.clip(np.asarray(scores, dtype=np.float64), -CLIP, CLIP))

    def learn_many(self, indices: np.ndarray, values: np.ndarray, y: Any) -> np.ndarray:
        labels = np.asarray(y, dtype=bool).reshape(-1)
        if labels.shape[0] != len(indices):
            raise ValueError(f"{len(indices)} rows but {labels.shape[0]} labels")
        out = np.empty(len(labels), dtype=np.float64)
        for row, (i, label) in enumerate(zip(indices, labels.tolist())):
            user, item = self._pair(i)
            out[row] = float(sigmoid(np.array([self.model.predict_one(user, item)]))[0])
            self.model.learn_one(user, item, bool(label))
            self.n_updates += 1
        return out

    def predict_proba_one(self, x: dict) -> dict[bool, float]:
        p = float(sigmoid(np.array([self.model.predict_one(x["user"], x["item"])]))[0])
        return {False: 1.0 - p, True: p}

    def learn_one(self, x: dict, y: bool) -> None:
        """``x`` must carry ``user`` and ``item`` (River's reco models are keyed by them)."""
        self.model.learn_one(x["user"], x["item"], bool(y))
        self.n_updates += 1


def _river_logistic(optimizer: Any) -> Any:
    from river import linear_model

    # no separate intercept: the featurizer's "bias" slot plays that role, as in our learners
    return linear_model.LogisticRegression(optimizer=optimizer, intercept_lr=0.0)


def _river_ftrl(params: dict[str, Any], seed: int) -> Any:
    from river import optim

    return _river_logistic(optim.FTRLProximal(**params))


def _river_adam(params: dict[str, Any], seed: int) -> Any:
    from river import optim

    return _river_logistic(optim.Adam(params.pop("learning_rate", 0.1), **params))


def _river_sgd(params: dict[str, Any], seed: int) -> Any:
    from river import optim

    return _river_logistic(optim.SGD(params.pop("learning_rate", 0.01)))


def _river_fm(params: dict[str, Any], seed: int) -> Any:
    from river import facto

    return facto.FMClassifier(n_factors=params.pop("n_factors", 8), seed=seed, **params)


def _river_baseline(params: dict[str, Any], seed: int) -> Any:
    from river import optim, reco

    return reco.Baseline(loss=optim.losses.Log(), **params)


def _river_biasedmf(params: dict[str, Any], seed: int) -> Any:
    from river import optim, reco

    return reco.BiasedMF(n_factors=params.pop("n_factors", 8), loss=optim.losses.Log(), seed=seed, **params)


def _river_funkmf(params: dict[str, Any], seed: int) -> Any:
    from river import optim, reco

    return reco.FunkMF(n_factors=params.pop("n_factors", 8), loss=optim.losses.Log(), seed=seed, **params)


# River models: name -> (builder of the River estimator from the params and a seed, our adapter for it)
RIVER_MODELS: dict[str, tuple[Callable[[dict[str, Any], int], Any], type[RiverClassifier]]] = {
    "river-ftrl": (_river_ftrl, RiverClassifier),
    "river-adam": (_river_adam, RiverClassifier),
    "river-sgd": (_river_sgd, RiverClassifier),
    "river-fm": (_river_fm, RiverClassifier),
    "river-baseline": (_river_baseline, RiverRanker),
    "river-biasedmf": (_river_biasedmf, RiverRanker),
    "river-funkmf": (_river_funkmf, RiverRanker),
}


def _river_model(name: str, bits: int, **params: Any) -> RiverClassifier:
    build, adapter = RIVER_MODELS[name]
    params = dict(params)
    seed = params.pop("seed", 7)
    return adapter(build(params, seed), bits=bits, name=name)


# The one learner registry: name -> builder(bits=..., **params). `fedstream learn --model` offers exactly
# these names; a learner registered here (or in online.learners.LEARNERS) is a CLI choice with no other edit.
MODELS: dict[str, Callable[..., HashedLogisticRegression | RiverClassifier]] = {
    **LEARNERS,
    **{name: partial(_river_model, name) for name in RIVER_MODELS},
}
MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
RANKERS = frozenset(name for name, (_, adapter) in RIVER_MODELS.items() if adapter is RiverRanker)


def make_model(name: str, bits: int, **params: Any) -> HashedLogisticRegression | RiverClassifier:
    """A click model by name from :data:`MODELS`: ``ftrl|adam|sgd`` (ours, numpy) or ``river-ftrl|river-adam|
    river-sgd|river-fm|river-biasedmf|river-funkmf|river-baseline`` (River's, adapted). ``params`` go to the
    learner (ours) or to River's optimizer/model."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return MODELS[name](bits=bits, **params)


__all__ = ["RiverClassifier", "RiverRanker", "make_model", "MODELS", "MODEL_NAMES"]
