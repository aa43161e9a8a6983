"""Checks, once per process, that River's Page-Hinkley privates still mean what ``error.page_hinkley`` reads.

:class:`drift.detectors.errors.ErrorPageHinkley` reads ``_x_mean``, ``_sum_increase`` and ``_min_increase``
(River has no public statistic). A seeded sequence goes through River's test and through the recursion
written out here; any difference (values, counts, when it fires) stops the detector loudly.
"""

from __future__ import annotations

import functools
import math

import numpy as np

_PARAMS = dict(min_instances=5, delta=0.05, threshold=3.0, alpha=0.99, mode="up")


class RiverChanged(RuntimeError):
    """River's Page-Hinkley internals no longer mean what the error detectors read."""


def _sample() -> list[float]:
    """60 calm values, then a rise: the test must fire on a value of the rise."""
    rng = np.random.default_rng(17)
    return [float(x) for x in np.r_[rng.normal(1.0, 0.2, 60), rng.normal(2.0, 0.2, 40)]]


def _disagreement() -> str | None:
    """What differs between River's Page-Hinkley and the recursion it documents (None: nothing)."""
    from river.drift import PageHinkley

    test = PageHinkley(**_PARAMS)
    alpha, delta = _PARAMS["alpha"], _PARAMS["delta"]
    n, mean, increase, lowest = 0, 0.0, 0.0, math.inf
    for step, x in enumerate(_sample()):
        n += 1
        mean += (x - mean) / n
        increase = alpha * increase + (x - mean) - delta
        lowest = min(lowest, increase)
        fires = n >= _PARAMS["min_instances"] and increase - lowest > _PARAMS["threshold"]
        test.update(x)
        theirs = (test._x_mean.n, test._x_mean.get(), test._sum_increase, test._min_increase)
        if theirs[0] != n or not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
                                     for a, b in zip(theirs[1:], (mean, increase, lowest))):
            return f"value {step}: (n, mean, sum_increase, min_increase) = {theirs}, expected {(n, mean, increase, lowest)}"
        if bool(test.drift_detected) != fires:
            return f"value {step}: drift_detected = {test.drift_detected}, expected {fires}"
        if fires:
            return None
    return "the rise never fired"


@functools.cache
def page_hinkley_agrees() -> bool:
    """True when River's Page-Hinkley privates match the written-out recursion (checked once per process);
    otherwise raises :class:`RiverChanged` saying what differs."""
    try:
        problem = _disagreement()
    except Exception as exc:  # a private that kept its name but not its shape, or lost its name
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        import river

        raise RiverChanged(f"River {river.__version__} PageHinkley internals changed meaning ({problem}); "
                           "error.page_hinkley reads them: pin the River version or update drift/detectors/errors.py")
    return True
