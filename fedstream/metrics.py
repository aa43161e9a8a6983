"""Scores every room uses (online evaluation, drift reports, federated tables, benchmarks), in one neutral home.

>>> import numpy as np
>>> roc_auc(np.array([0, 1, 1]), np.array([0.1, 0.9, 0.4]))
1.0
>>> round(mean_logloss(np.array([1, 0]), np.array([0.9, 0.2])), 4)
0.1643
>>> round(expected_calibration_error(np.array([0, 0, 1, 1]), np.array([0.1, 0.1, 0.9, 0.7]), bins=2), 4)
0.15
"""

from __future__ import annotations

import numpy as np


def logloss(y: np.ndarray, p: np.ndarray, clip: float = 1e-15) -> np.ndarray:
    p = np.clip(p, clip, 1 - clip)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def mean_logloss(y: np.ndarray, p: np.ndarray, clip: float = 1e-15) -> float:
    """Mean logloss of probabilities ``p`` for binary labels ``y``; NaN on no data."""
    if len(y) == 0:
        return float("nan")
    return float(np.mean(logloss(np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64), clip)))


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Exact ROC AUC (ties count one half); NaN when only one class is present."""
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=bool)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """ECE with ``bins`` equal-mass bins: the predictions sorted and cut into bins of (nearly) equal count,
    then the count-weighted mean of |mean prediction - observed rate| per bin. NaN on no data.

    Equal-mass (not equal-width) because conversion probabilities crowd near 0: equal-width bins would
    leave most bins empty and put almost every prediction in the first one.
    """
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    order = np.argsort(p, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(bins, len(order))):
        total += len(chunk) * abs(float(p[chunk].mean()) - float(y[chunk].mean()))
    return total / len(y)
