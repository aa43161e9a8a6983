"""Logistic regression over the shared hashed features, with SGD, Adam and FTRL-Proximal updates.

Design notes: `online/README.md` ("`online/learners.py`"). The machinery the three learners share
(:class:`HashedLogisticRegression`) and the feature-hashing helpers are in :mod:`online.learner_base`.

Example:
    >>> import numpy as np
    >>> model = FTRLProximalClassifier(bits=8, alpha=0.5, l2=0.0)
    >>> indices = np.array([[0, 3], [0, 5]], dtype=np.int32)
    >>> values = np.ones((2, 2), dtype=np.float32)
    >>> for _ in range(20):
    ...     _ = model.learn_many(indices, values, np.array([True, False]))
    >>> p = model.predict_proba_many(indices, values)
    >>> bool(p[0] > 0.8 and p[1] < 0.2)
    True
    >>> model.learn_one({0: 1.0, 3: 1.0}, True)
    >>> model.predict_proba_one({0: 1.0, 3: 1.0})[True] > 0.8
    True
    >>> model.n_updates
    41
"""

from __future__ import annotations

import math

import numpy as np

from online import kernels
from online.learner_base import HashedLogisticRegression, _float32_sqrt
from online.learner_base import (  # noqa: F401  (re-exported: their home before online/learner_base.py)
    CLIP, DTYPES, KEY_CACHE, Q_SCALE, SMALL_ROW, dict_to_arrays, hash_key, merge_row_duplicates, sigmoid)


class SGDClassifier(HashedLogisticRegression):
    """Logistic regression with plain SGD: ``w_i ← w_i − η (g_i + λ₂ w_i)`` on the slots of each example.

    The L2 term is lazy (only slots present in the example shrink), the usual choice for sparse data.
    ``learn_many`` learns its rows one after the other (exact, the default ``max_delay=1``); with
    ``max_delay=k > 1`` each slot takes one step per chunk of ``k`` rows on the summed gradient of the
    rows carrying it divided by ``√(their count)`` (`online/README.md`, "`online/learners.py`").

    Example:
        >>> import numpy as np
        >>> model = SGDClassifier(bits=4, learning_rate=0.5)
        >>> model.learn_one({1: 1.0, 2: 2.0}, True)      # p was 0.5, so g = (0.5 - 1) x
        >>> model.weights[[1, 2]].tolist()
        [0.25, 0.5]
    """

    _arrays = ("w",)

    def __init__(self, bits: int = 20, learning_rate: float = 0.01, l2: float = 0.0,
                 max_delay: int | None = 1, native: bool = True, dtype: str = "float64", seed: int = 0) -> None:
        if learning_rate <= 0 or l2 < 0:
            raise ValueError("learning_rate must be > 0 and l2 >= 0")
        super().__init__(bits, max_delay, native, dtype, seed)
        self.learning_rate = learning_rate
        self.l2 = l2

    def _learn_native(self, indices: np.ndarray, values: np.ndarray, labels: np.ndarray, out: np.ndarray) -> None:
        kernels.sgd_learn(self.w, indices, values, labels, out, float(self.learning_rate), float(self.l2))

    def _step_python(self, slots: list[int], values: list[float], error: float) -> None:
        views = self.__dict__.get("_scratch_views")
        if views is None or views[0].obj is not self.w:
            views = self._new_views()
        (w,) = views
        learning_rate, l2 = float(self.learning_rate), float(self.l2)
        for slot, value in zip(slots, values):
            weight = w[slot]
            w[slot] = weight - learning_rate * (error * value + l2 * weight)

    def _apply(self, slots: np.ndarray, gradient: np.ndarray, values: np.ndarray, rows: int) -> None:
        total, count = self._scratch_buffers(2)
        np.add.at(total, slots, gradient)
        np.add.at(count, slots, values != 0)
        g = total[slots] / np.sqrt(np.maximum(count[slots], 1.0))  # Σg/√k over the k rows carrying the slot
        total[slots] = 0.0
        count[slots] = 0.0
        w = self._w_at(slots)
        self._set_w(slots, w - self.learning_rate * (g + self.l2 * w))


class AdamClassifier(HashedLogisticRegression):
    """Logistic regression with lazy Adam (Kingma & Ba 2015), per-coordinate moments, global step count.

    For each touched slot: ``m ← β₁m + (1−β₁)g``, ``v ← β₂v + (1−β₂)g²``,
    ``w ← w − η · √(1−β₂ᵗ)/(1−β₁ᵗ) · m / (√v + ε)``; untouched slots keep their moments (lazy, sparse).

    Example:
        >>> model = AdamClassifier(bits=4, learning_rate=0.1)
        >>> model.learn_one({3: 1.0}, False)   # first step moves by ~learning_rate: m̂/√v̂ = sign(g)
        >>> round(float(model.weights[3]), 6)
        -0.1
        >>> model.t
        1
    """

    _arrays = ("w", "m", "v")

    def __init__(self, bits: int = 20, learning_rate: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.999,
                 eps: float = 1e-8, max_delay: int | None = 1, native: bool = True, dtype: str = "float64",
                 seed: int = 0) -> None:
        if learning_rate <= 0 or not (0 <= beta_1 < 1 and 0 <= beta_2 < 1) or eps <= 0:
            raise ValueError("need learning_rate > 0, 0 <= beta_1, beta_2 < 1 and eps > 0")
        super().__init__(bits, max_delay, native, dtype, seed)
        self.learning_rate = learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.eps = eps

    def _learn_native(self, indices: np.ndarray, values: np.ndarray, labels: np.ndarray, out: np.ndarray) -> None:
        kernels.adam_learn(self.w, self.m, self.v, indices, values, labels, out, float(self.learning_rate),
                           float(self.beta_1), float(self.beta_2), float(self.eps), float(self.n_batches))

    def _step_python(self, slots: list[int], values: list[float], error: float) -> None:
        views = self.__dict__.get("_scratch_views")
        if (views is None or views[0].obj is not self.w or views[1].obj is not self.m
                or views[2].obj is not self.v):
            views = self._new_views()
        w, m, v = views
        beta_1, beta_2, eps = float(self.beta_1), float(self.beta_2), float(self.eps)
        t = float(self.n_batches) + 1.0
        lr = float(self.learning_rate) * math.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        for slot, value in zip(slots, values):
            g = error * value
            m_new = beta_1 * m[slot] + (1 - beta_1) * g
            v_new = beta_2 * v[slot] + (1 - beta_2) * g * g
            w[slot] = w[slot] - lr * m_new / (math.sqrt(v_new) + eps)
            m[slot] = m_new
            v[slot] = v_new

    @property
    def t(self) -> int:
        """Adam's step count: one per row learned (exact), or per chunk of ``max_delay > 1`` rows."""
        return self.n_batches

    def _apply(self, slots: np.ndarray, gradient: np.ndarray, values: np.ndarray, rows: int) -> None:
        (total,) = self._scratch_buffers(1)
        np.add.at(total, slots, gradient)
        g = total[slots] / rows  # batch-mean gradient per slot (same value for duplicate slots)
        total[slots] = 0.0
        step = self.n_batches + 1
        lr = self.learning_rate * math.sqrt(1 - self.beta_2**step) / (1 - self.beta_1**step)
        m = self.beta_1 * self.m[slots].astype(np.float64) + (1 - self.beta_1) * g
        v = self.beta_2 * self.v[slots].astype(np.float64) + (1 - self.beta_2) * g * g
        self._set_w(slots, self._w_at(slots) - lr * m / (np.sqrt(v) + self.eps))
        self.m[slots] = m
        self.v[slots] = v


class FTRLProximalClassifier(HashedLogisticRegression):
    """Logistic regression with FTRL-Proximal, exactly McMahan et al. 2013, "Ad Click Prediction", Alg. 1.

    Per coordinate ``i`` with gradient ``g_i``::

        σ_i = (√(n_i + g_i²) − √n_i) / α
        z_i ← z_i + g_i − σ_i w_i
        n_i ← n_i + g_i²
        w_i = 0                                              if |z_i| ≤ λ₁
        w_i = −(z_i − sgn(z_i) λ₁) / ((β + √n_i)/α + λ₂)     otherwise

    ``w`` is kept materialized for the touched slots (the paper computes it lazily at prediction time:
    same numbers). L1 makes rare, uninformative slots exactly zero.

    Example:
        >>> model = FTRLProximalClassifier(bits=4, alpha=0.1, beta=1.0, l1=0.0, l2=0.0)
        >>> model.learn_one({2: 1.0}, True)   # g = -0.5: σ = 5, z = -0.5, n = 0.25
        >>> float(model.z[2]), float(model.n[2]), round(float(model.weights[2]), 6)
        (-0.5, 0.25, 0.033333)
    """

    _arrays = ("w", "z", "n")

    def __init__(self, bits: int = 20, alpha: float = 0.05, beta: float = 1.0, l1: float = 0.0,
                 l2: float = 1.0, max_delay: int | None = 1, native: bool = True, dtype: str = "float64",
                 seed: int = 0) -> None:
        if alpha <= 0 or beta < 0 or l1 < 0 or l2 < 0:
            raise ValueError("need alpha > 0 and beta, l1, l2 >= 0")
        super().__init__(bits, max_delay, native, dtype, seed)
        self.alpha = alpha
        self.beta = beta
        self.l1 = l1
        self.l2 = l2

    def _learn_native(self, indices: np.ndarray, values: np.ndarray, labels: np.ndarray, out: np.ndarray) -> None:
        kernels.ftrl_learn(self.w, self.z, self.n, indices, values, labels, out, float(self.alpha),
                           float(self.beta), float(self.l1), float(self.l2))

    def _step_python(self, slots: list[int], values: list[float], error: float) -> None:
        views = self.__dict__.get("_scratch_views")
        if (views is None or views[0].obj is not self.w or views[1].obj is not self.z
                or views[2].obj is not self.n):
            views = self._new_views()
        w, z, n = views
        alpha, beta, l1, l2 = float(self.alpha), float(self.beta), float(self.l1), float(self.l2)
        root_of_stored = math.sqrt if self.dtype == "float64" else _float32_sqrt  # as the kernel: see _float32_sqrt
        for slot, value in zip(slots, values):
            g = error * value
            n_old = n[slot]
            n_new = n_old + g * g
            sigma = (math.sqrt(n_new) - root_of_stored(n_old)) / alpha
            z_new = z[slot] + g - sigma * w[slot]
            z[slot] = z_new
            n[slot] = n_new
            if abs(z_new) <= l1:
                w[slot] = 0.0
            else:
                w[slot] = -(z_new - math.copysign(l1, z_new)) / ((beta + math.sqrt(n_new)) / alpha + l2)

    def _apply(self, slots: np.ndarray, gradient: np.ndarray, values: np.ndarray, rows: int) -> None:
        # per distinct slot: Σg and Σg² (a chunk of ≤ max_delay rows is small, so sorting it is cheaper
        # than scattering into 2**bits-sized accumulators)
        touched, where = np.unique(slots, return_inverse=True)
        g = np.bincount(where, weights=gradient, minlength=len(touched))
        g2 = np.bincount(where, weights=gradient * gradient, minlength=len(touched))
        n_old = self.n[touched].astype(np.float64)
        n_new = n_old + g2
        sigma = (np.sqrt(n_new) - np.sqrt(n_old)) / self.alpha
        z = self.z[touched].astype(np.float64) + g - sigma * self._w_at(touched)
        self.z[touched] = z
        self.n[touched] = n_new
        self._set_w(touched, self.closed_form(z, n_new))

    def closed_form(self, z: np.ndarray, n: np.ndarray) -> np.ndarray:
        """The weights FTRL-Proximal derives from ``z`` and ``n`` (the paper's per-coordinate arg-min)."""
        shrunk = z - np.sign(z) * self.l1
        w = -shrunk / ((self.beta + np.sqrt(n)) / self.alpha + self.l2)
        return np.where(np.abs(z) <= self.l1, 0.0, w)


LEARNERS: dict[str, type[HashedLogisticRegression]] = {
    "sgd": SGDClassifier,
    "adam": AdamClassifier,
    "ftrl": FTRLProximalClassifier,
}

__all__ = ["HashedLogisticRegression", "SGDClassifier", "AdamClassifier", "FTRLProximalClassifier", "LEARNERS",
           "sigmoid", "dict_to_arrays", "hash_key"]
