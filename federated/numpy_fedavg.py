"""Plain-numpy FedAvg of the wide model: the peer that measures TFF's overhead on the same model and data.

Same function as the Keras wide model (``p = σ(b + Σ w[slot]·value)``), same client optimizer (mini-batch
SGD on mean logloss, one pass per round by default), example-count weighted mean of the client deltas, and
a plain server step ``w += server_lr · Δ``; ``touched=True`` (the default, like
:func:`federated.aggregators.touched_mean_factory`) averages each slot only over the clients that moved
it. No privacy, no TFF: only what the arithmetic costs.

Example:
    >>> rng = np.random.default_rng(0)
    >>> idx = rng.integers(0, 64, (200, 3)).astype(np.int32); val = np.ones((200, 3), np.float32)
    >>> y = (idx[:, 0] < 32).astype(np.float32)
    >>> model = NumpyWide(bits=6)
    >>> for _ in range(5):
    ...     model = fedavg_round(model, [(idx[:100], val[:100], y[:100]), (idx[100:], val[100:], y[100:])])
    >>> float(model.predict_proba_many(idx[:1], val[:1])[0]) != 0.5
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class NumpyWide:
    """Wide logistic embedding bag as two numpy arrays."""

    bits: int
    weights: np.ndarray | None = None
    bias: float = 0.0

    def __post_init__(self) -> None:
        if self.weights is None:
            self.weights = np.zeros(1 << self.bits, np.float32)

    def copy(self) -> NumpyWide:
        return NumpyWide(self.bits, self.weights.copy(), self.bias)

    def predict_proba_many(self, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
        z = self.bias + (self.weights[indices] * values).sum(axis=1)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))

    def sgd_epoch(self, indices, values, labels, *, learning_rate: float, batch_size: int,
                  rng: np.random.Generator | None = None) -> None:
        """One pass of mini-batch SGD on mean logloss (Keras' gradient: (p - y) / batch per row)."""
        order = rng.permutation(len(labels)) if rng is not None else np.arange(len(labels))
        n_slots = len(self.weights)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            idx, val = indices[rows], values[rows]
            error = (self.predict_proba_many(idx, val) - labels[rows]) / len(rows)
            gradient = np.bincount(idx.ravel(), weights=(error[:, None] * val).ravel(), minlength=n_slots)
            self.weights -= (learning_rate * gradient).astype(np.float32)
            self.bias -= float(learning_rate * error.sum())


def fedavg_round(model: NumpyWide, clients: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                 client_learning_rate: float = 0.5, batch_size: int = 32, epochs: int = 1,
                 server_learning_rate: float = 1.0, seed: int | None = None, touched: bool = True) -> NumpyWide:
    """One FedAvg round: every client trains a copy locally; the server applies the weighted mean delta
    (per slot over the clients whose delta is non-zero there when ``touched``)."""
    total = sum(len(c[2]) for c in clients)
    delta_w = np.zeros_like(model.weights, dtype=np.float64)
    touched_share = np.zeros_like(delta_w)
    delta_b = 0.0
    for k, (indices, values, labels) in enumerate(clients):
        local = model.copy()
        rng = np.random.default_rng([seed, k]) if seed is not None else None
        for _ in range(epochs):
            local.sgd_epoch(indices, values, labels, learning_rate=client_learning_rate, batch_size=batch_size, rng=rng)
        share = len(labels) / total
        delta_w += share * (local.weights - model.weights)
        touched_share += share * (local.weights != model.weights)
        delta_b += share * (local.bias - model.bias)
    if touched:
        delta_w = np.divide(delta_w, touched_share, out=np.zeros_like(delta_w), where=touched_share > 0)
    return NumpyWide(model.bits, (model.weights + server_learning_rate * delta_w).astype(np.float32),
                     model.bias + server_learning_rate * delta_b)
