"""Click and purchase in one model: a shared weight vector plus a click head and a conversion head.

Over the shared hashed features (:class:`streams.features.Featurizer`), with ``x`` a click's feature row::

    P(click | impression)  = sigmoid(x · (w_shared + w_click))
    P(order | click)       = sigmoid(x · (w_shared + w_conversion))
    P(order | impression)  = P(click | impression) * P(order | click)

Both tasks move ``w_shared`` (what a user likes, what an item is worth: the same latent terms drive clicks
and orders); each head keeps what is task-specific (base rates, position and page effects that only act on
clicks). Every vector learns by AdaGrad on its logistic loss, with lazy L2 on the example's slots.

Delayed labels: the click head learns at the impression; the conversion head learns a click only when
:class:`online.attribution.AttributionJoiner` resolves it: a positive when the order arrives, a negative
when the click's attribution window closes. The learner never sees "no order yet" as a label (see
``online/README.md`` for the alternatives and why this one).

Example:
    >>> model = MultiTaskClassifier(bits=10)
    >>> x = {"bias": 1.0, "item=i1": 1.0}
    >>> for _ in range(200):
    ...     model.learn_one(x, True)            # clicked
    ...     model.learn_conversion_one(x, False)  # window closed without an order
    >>> model.predict_proba_one(x)[True] > 0.8, model.predict_conversion_one(x) < 0.2
    (True, True)
    >>> expected = model.predict_proba_one(x)[True] * model.predict_conversion_one(x)
    >>> abs(model.predict_purchase_one(x) - expected) < 1e-12
    True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from river import base

from online.learners import CLIP, dict_to_arrays, sigmoid

TASKS = ("click", "conversion")


class MultiTaskClassifier(base.Classifier):
    """Shared + per-task hashed logistic weights (AdaGrad); River protocol on the click task."""

    def __init__(self, bits: int = 20, learning_rate: float = 0.05, shared_rate: float = 0.05,
                 l2: float = 1e-6, eps: float = 1.0) -> None:
        self.bits = bits
        self.learning_rate = learning_rate
        self.shared_rate = shared_rate
        self.l2 = l2
        self.eps = eps
        size = 1 << bits
        self._mask = size - 1
        self.w = {name: np.zeros(size) for name in ("shared", *TASKS)}
        self.n = {name: np.zeros(size) for name in ("shared", *TASKS)}
        self.updates = dict.fromkeys(TASKS, 0)

    # -- arrays (the worker's and benchmarks' path) ---------------------------------------------------------

    def logits_many(self, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Click and conversion logits of ``(n, F)`` rows."""
        shared = (self.w["shared"][indices] * values).sum(axis=1)
        click = shared + (self.w["click"][indices] * values).sum(axis=1)
        return click, shared + (self.w["conversion"][indices] * values).sum(axis=1)

    def predict_many(self, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(click | impression) and P(order | click) of ``(n, F)`` rows."""
        click, conversion = self.logits_many(np.atleast_2d(indices), np.atleast_2d(values))
        return sigmoid(click), sigmoid(conversion)

    def learn_row(self, task: str, indices: np.ndarray, values: np.ndarray, y: bool) -> float:
        """One test-then-train step of ``task`` on one feature row; returns the prediction before it."""
        slots, inverse = np.unique(np.asarray(indices).reshape(-1), return_inverse=True)  # colliding slots add up
        vals = np.bincount(inverse, weights=np.asarray(values, dtype=np.float64).reshape(-1), minlength=len(slots))
        shared, head = self.w["shared"], self.w[task]
        dot = float((shared[slots] * vals).sum() + (head[slots] * vals).sum())
        p = 1.0 / (1.0 + math.exp(-min(max(dot, -CLIP), CLIP)))
        gradient = (p - float(y)) * vals
        self._step("shared", slots, gradient, self.shared_rate)
        self._step(task, slots, gradient, self.learning_rate)
        self.updates[task] += 1
        return p

    def learn_many(self, task: str, indices: np.ndarray, values: np.ndarray, y: Any) -> np.ndarray:
        """Rows one after the other (exact sequential); returns each row's prediction before its update."""
        labels = np.asarray(y, dtype=bool).reshape(-1)
        return np.array([self.learn_row(task, indices[k], values[k], labels[k]) for k in range(len(labels))])

    def _step(self, name: str, slots: np.ndarray, gradient: np.ndarray, rate: float) -> None:
        w, n = self.w[name], self.n[name]
        g = gradient + self.l2 * w[slots]
        n[slots] += g * g
        w[slots] -= rate * g / np.sqrt(n[slots] + self.eps)

    # -- River protocol ---------------------------------------------------------------------------------------

    def _row(self, x: dict) -> tuple[np.ndarray, np.ndarray]:
        return dict_to_arrays(x, self._mask)

    def predict_proba_one(self, x: dict) -> dict[bool, float]:
        p = float(self.predict_many(*self._row(x))[0][0])
        return {False: 1.0 - p, True: p}

    def predict_conversion_one(self, x: dict) -> float:
        """P(order | click)."""
        return float(self.predict_many(*self._row(x))[1][0])

    def predict_purchase_one(self, x: dict) -> float:
        """P(order | impression) = P(click) * P(order | click): the expected purchase of showing the item."""
        click, conversion = self.predict_many(*self._row(x))
        return float(click[0] * conversion[0])

    def learn_one(self, x: dict, y: bool) -> None:
        """The click task (River's ``learn_one``)."""
        self.learn_row("click", *self._row(x), y)

    def learn_conversion_one(self, x: dict, y: bool) -> None:
        """The conversion task, once the click's label is final (attributed order, or its window closed)."""
        self.learn_row("conversion", *self._row(x), y)

    @property
    def _multiclass(self) -> bool:
        return False
