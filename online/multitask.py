"""Click and purchase in one model: a shared weight vector plus a click head and a conversion head.

Over the shared hashed features (:class:`streams.features.Featurizer`), with ``x`` a click's feature row::

    P(click | impression)  = sigmoid(x · (w_shared + w_click))
    P(order | click)       = sigmoid(x · (w_shared + w_conversion))
    P(order | impression)  = P(click | impression) * P(order | click)

Both tasks move ``w_shared`` (what a user likes, what an item is worth: the same latent terms drive clicks
and orders); each head keeps what is task-specific (base rates, position and page effects that only act on
clicks). Every vector learns by AdaGrad on its logistic loss, with lazy L2 on the example's slots (a numba
kernel per row: about 2 µs for the 18 slots of a click row).

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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from river import base

from fedstream.settings import MultiTaskSettings
from online.attribution import AttributionJoiner, Resolved
from online.learners import CLIP, dict_to_arrays, sigmoid  # noqa: I001 (sets numba's cache dir first)
from numba import njit
from streams.features import FeatureContext, Featurizer
from streams.schemas import Click, Order

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

    def predict_row(self, indices: np.ndarray, values: np.ndarray) -> tuple[float, float]:
        """P(click | impression) and P(order | click) of one row (the native path of the worker hook)."""
        return _predict_row(self.w["shared"], self.w["click"], self.w["conversion"],
                            np.ascontiguousarray(indices, dtype=np.int64).reshape(-1) & self._mask,
                            np.ascontiguousarray(values, dtype=np.float64).reshape(-1))

    def learn_row(self, task: str, indices: np.ndarray, values: np.ndarray, y: bool) -> float:
        """One test-then-train step of ``task`` on one feature row; returns the prediction before it."""
        self.updates[task] += 1
        return _learn_row(self.w["shared"], self.n["shared"], self.w[task], self.n[task],
                          np.ascontiguousarray(indices, dtype=np.int64).reshape(-1) & self._mask,
                          np.ascontiguousarray(values, dtype=np.float64).reshape(-1), float(y),
                          self.shared_rate, self.learning_rate, self.l2, self.eps)

    def learn_many(self, task: str, indices: np.ndarray, values: np.ndarray, y: Any) -> np.ndarray:
        """Rows one after the other (exact sequential); returns each row's prediction before its update."""
        labels = np.asarray(y, dtype=bool).reshape(-1)
        return np.array([self.learn_row(task, indices[k], values[k], labels[k]) for k in range(len(labels))])

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


@njit(cache=True)
def _logit(w: np.ndarray, head: np.ndarray, slots: np.ndarray, values: np.ndarray) -> float:
    dot = 0.0
    for k in range(len(slots)):
        dot += (w[slots[k]] + head[slots[k]]) * values[k]
    return min(max(dot, -CLIP), CLIP)


@njit(cache=True)
def _predict_row(shared: np.ndarray, click: np.ndarray, conversion: np.ndarray, slots: np.ndarray,
                 values: np.ndarray) -> tuple[float, float]:
    return (1.0 / (1.0 + math.exp(-_logit(shared, click, slots, values))),
            1.0 / (1.0 + math.exp(-_logit(shared, conversion, slots, values))))


@njit(cache=True)
def _learn_row(shared: np.ndarray, n_shared: np.ndarray, head: np.ndarray, n_head: np.ndarray, slots: np.ndarray,
               values: np.ndarray, y: float, shared_rate: float, rate: float, l2: float, eps: float) -> float:
    """AdaGrad step of the shared vector and one head on one row (a slot repeated in the row steps once per
    occurrence); returns the prediction before the step."""
    p = 1.0 / (1.0 + math.exp(-_logit(shared, head, slots, values)))
    for k in range(len(slots)):
        s = slots[k]
        g = (p - y) * values[k]
        gs = g + l2 * shared[s]
        n_shared[s] += gs * gs
        shared[s] -= shared_rate * gs / math.sqrt(n_shared[s] + eps)
        gh = g + l2 * head[s]
        n_head[s] += gh * gh
        head[s] -= rate * gh / math.sqrt(n_head[s] + eps)
    return p


class MultiTaskState:
    """A multi-task learner and its attribution joiner, fed in event order (the worker's hook; picklable).

    :meth:`click` predicts and learns one impression (its feature ``row``) and holds it if clicked;
    :meth:`order` credits the held clicks of the order's user and items; the conversion head learns every
    click the joiner resolves, and :attr:`resolved` counts them.
    """

    def __init__(self, model: MultiTaskClassifier, joiner: AttributionJoiner, calibrate: bool = True) -> None:
        self.model = model
        self.joiner = joiner
        self.resolved = 0
        self.calibrator = DelayCalibrator() if calibrate else None

    @classmethod
    def from_settings(cls, settings: MultiTaskSettings, bits: int) -> MultiTaskState:
        joiner = AttributionJoiner(settings.attribution_window_s, settings.merchant_windows_s, settings.lateness_s,
                                   settings.max_pending)
        return cls(MultiTaskClassifier(bits=bits), joiner)

    def click(self, event: Click, row: np.ndarray) -> tuple[float, float]:
        """Test-then-train on one impression (feature values 1, as the worker's rows); returns P(click) and
        P(order | click) predicted before it."""
        model = self.model
        slots = np.asarray(row, dtype=np.int64) & model._mask
        ones = np.ones(len(slots))
        w = model.w
        p_click, p_conversion = _predict_row(w["shared"], w["click"], w["conversion"], slots, ones)
        logit = math.log(max(p_conversion, 1e-12) / max(1.0 - p_conversion, 1e-12))
        if self.calibrator is not None:
            p_conversion = self.calibrator.predict(logit)
        _learn_row(w["shared"], model.n["shared"], w["click"], model.n["click"], slots, ones, float(event.clicked),
                   model.shared_rate, model.learning_rate, model.l2, model.eps)
        model.updates["click"] += 1
        if event.clicked:
            self._learn(self.joiner.click(event.merchant_id, event.user_id, event.item_id, event.timestamp,
                                          (slots.astype(np.int32), logit)))
        elif self.joiner.pending:
            self._learn(self.joiner.advance(event.timestamp))
        else:
            self.joiner.latest = max(self.joiner.latest, event.timestamp)
        return p_click, p_conversion

    def order(self, event: Order) -> None:
        self._learn(self.joiner.order(event.merchant_id, event.user_id, [line.item_id for line in event.items],
                                      event.timestamp))

    def observe_block(self, events: Iterable[Any], rows: Sequence[Sequence[int]]) -> None:
        """The worker's block in offset order; ``rows`` are its clicks' feature slots, in the same order."""
        clicks = iter(rows)
        for event in events:
            if type(event) is Click:
                self.click(event, np.asarray(next(clicks), dtype=np.int64))
            elif type(event) is Order:
                self.order(event)

    def adopt_merchants(self, theirs: MultiTaskState | None, owned: Callable[[str], bool]) -> None:
        """Take the held clicks of the merchants ``owned`` says yes to from a peer's state (None: the peer
        ran without one, so it held none of them): they move with their partition slot
        (:meth:`AttributionJoiner.adopt_merchants`). The weights are shared, merged at assembly, not moved."""
        self.joiner.adopt_merchants(None if theirs is None else theirs.joiner, owned)

    def own_merchants(self, owned: Callable[[str], bool]) -> None:
        """Learn from now on only the held clicks of the merchants ``owned`` says yes to: the others' are parked
        for their slot's new owner (:meth:`AttributionJoiner.own_merchants`)."""
        self.joiner.own_merchants(owned)

    def drop_merchants(self, dropped: Callable[[str], bool]) -> None:
        """Forget the held clicks of the merchants ``dropped`` says yes to (a peer took their slot after us)."""
        self.joiner.drop_merchants(dropped)

    def _learn(self, resolved: list[Resolved]) -> None:
        for done in resolved:
            row, logit = done.payload
            self.model.learn_row("conversion", row, np.ones(len(row)), done.converted)
            if self.calibrator is not None:
                self.calibrator.learn(logit, done.converted)
        self.resolved += len(resolved)


class DelayCalibrator:
    """``P = sigmoid(a · logit + b)`` over the conversion head's logit *as predicted at click time*, learned
    (AdaGrad) when the click's label is final: it maps what the head said a window before it learned the
    label to how often such clicks converted, i.e. it corrects what the delay itself does to the head."""

    def __init__(self, learning_rate: float = 0.02) -> None:
        self.learning_rate = learning_rate
        self.a, self.b = 1.0, 0.0
        self.n_a = self.n_b = 1.0

    def predict(self, logit: float) -> float:
        z = min(max(self.a * logit + self.b, -CLIP), CLIP)
        return 1.0 / (1.0 + math.exp(-z))

    def learn(self, logit: float, y: bool) -> None:
        g = self.predict(logit) - float(y)
        g_a, g_b = g * logit, g
        self.n_a += g_a * g_a
        self.n_b += g_b * g_b
        self.a -= self.learning_rate * g_a / math.sqrt(self.n_a)
        self.b -= self.learning_rate * g_b / math.sqrt(self.n_b)


class MultiTaskScorer:
    """The served form of a :class:`MultiTaskState`: float32 click weights ``shared + click``, conversion
    weights ``shared + conversion`` and the calibrator's ``(a, b)`` (8 MB at 20 bits instead of the learner's
    six float64 vectors and its held clicks). Predicts exactly what the state predicts, to float32 rounding."""

    def __init__(self, bits: int, click: np.ndarray, conversion: np.ndarray,
                 calibration: tuple[float, float] | None = None) -> None:
        self.bits = bits
        self.click = np.asarray(click, dtype=np.float32)
        self.conversion = np.asarray(conversion, dtype=np.float32)
        if self.click.shape != (1 << bits,) or self.conversion.shape != (1 << bits,):
            raise ValueError(f"click and conversion weights must have shape ({1 << bits},)")
        self.calibration = calibration

    @classmethod
    def from_state(cls, state: MultiTaskState) -> MultiTaskScorer:
        w, calibrator = state.model.w, state.calibrator
        return cls(state.model.bits, w["shared"] + w["click"], w["shared"] + w["conversion"],
                   None if calibrator is None else (calibrator.a, calibrator.b))

    def predict_many(self, indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(click | impression) and calibrated P(order | click) of ``(n, F)`` rows."""
        indices, values = np.atleast_2d(indices) & ((1 << self.bits) - 1), np.atleast_2d(values)
        click = np.clip((self.click[indices] * values).sum(axis=1, dtype=np.float64), -CLIP, CLIP)
        conversion = np.clip((self.conversion[indices] * values).sum(axis=1, dtype=np.float64), -CLIP, CLIP)
        if self.calibration is not None:
            a, b = self.calibration
            conversion = np.clip(a * conversion + b, -CLIP, CLIP)
        return sigmoid(click), sigmoid(conversion)

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        """P(click | impression) (the bundle's scorer protocol)."""
        return self.predict_many(indices, values)[0]


def purchase_order(predict: Any, featurizer: Featurizer, context: FeatureContext, merchant_id: str, user_id: str,
                   ranked: Sequence[str], when: float, device: str = "desktop",
                   weight: float = 1.0) -> tuple[list[int], np.ndarray]:
    """Positions of ``ranked`` (best first) re-ordered by ``weight · log P(order | impression) - log(1 + rank)``,
    and every item's P(order | impression) if shown in slot 0 of a recommendation page now; ``predict(rows,
    values) -> (P(click), calibrated P(order | click))``."""
    if not ranked:
        return [], np.zeros(0)
    rows = np.array([featurizer.slots_for(merchant_id, user_id, item, when, device, "recommendation", 0, context)
                     for item in ranked], dtype=np.int64)
    p_click, p_conversion = predict(rows, np.ones(rows.shape))
    purchase = p_click * p_conversion
    score = weight * np.log(np.maximum(purchase, 1e-12)) - np.log1p(np.arange(len(ranked)))
    return np.argsort(-score, kind="stable").tolist(), purchase


def rerank_by_purchase(state: MultiTaskState, featurizer: Featurizer, context: FeatureContext, merchant_id: str,
                       user_id: str, ranked: Sequence[str], when: float, device: str = "desktop",
                       weight: float = 1.0) -> list[str]:
    """``ranked`` (the two-stage recommender's order, best first) re-ordered by ``weight · log P(order |
    impression) - log(1 + rank)`` (:func:`purchase_order`): each item's expected purchase if shown in slot 0
    of a recommendation page now, weighed against the recommender's own rank (so its history and
    co-occurrence signal stays)."""

    def predict(rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p_click, p_conversion = state.model.predict_many(rows, values)
        if state.calibrator is not None:
            logits = np.log(np.maximum(p_conversion, 1e-12) / np.maximum(1.0 - p_conversion, 1e-12))
            p_conversion = np.array([state.calibrator.predict(float(z)) for z in logits])
        return p_click, p_conversion

    order, _ = purchase_order(predict, featurizer, context, merchant_id, user_id, ranked, when, device, weight)
    return [ranked[i] for i in order]
