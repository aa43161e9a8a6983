"""``label.*`` and ``feature.<field>.*``: reference window vs current window (z-test, PSI, KS, chi-squared)."""

from __future__ import annotations

import bisect
import math
from abc import abstractmethod
from collections.abc import Hashable
from typing import Literal

import numpy as np

from drift.detectors.base import CALIBRATED, Detector


class _TwoWindow(Detector):
    """Reference window right before a current window; the test runs every ``check_every`` values.

    With ``min_span_seconds`` (a period P) both windows are whole numbers of periods of event time: the
    current window is the last k·P seconds (the smallest k holding ``window`` values), the reference the
    k·P seconds before, so periodic fields are compared period against period (memory: ``max_values``).
    """

    def __init__(self, merchant_id: str, name: str, *, reference: int = 3000, window: int = 1500,
                 check_every: int = 250, min_span_seconds: float = 0.0, max_values: int = 200_000,
                 model_version: str | None = None, cooldown: int = 0, warmup: int = 0) -> None:
        super().__init__(merchant_id, name, model_version=model_version, cooldown=cooldown, warmup=warmup)
        if reference < 2 or window < 2:
            raise ValueError("reference and window need at least 2 values each")
        self.reference, self.window, self.check_every = reference, window, check_every
        self.min_span_seconds, self.max_values = min_span_seconds, max_values
        self._values: list = []
        self._times: list[float] = []
        self._indices: list[int] = []
        self.last_statistic: float | None = None

    def _observe(self, value, index: int, timestamp: float):
        self._values.append(value)
        self._times.append(timestamp)
        self._indices.append(index)
        if self.n_seen % self.check_every or self.n_seen < self._quiet_until:
            self._trim_to(len(self._values) - self.max_values)
            return None
        split = self._split()
        if split is None:
            return None
        ref_start, cur_start = split
        self._trim_to(ref_start)
        cur_start -= ref_start
        reference, current = self._values[:cur_start], self._values[cur_start:]
        found = self._test(reference, current)
        if found is None:
            return None
        statistic, threshold, details = found
        details = {**details, "reference_size": len(reference), "window_size": len(current)}
        return statistic, threshold, (self._indices[cur_start], self._times[cur_start]), details

    def _split(self) -> tuple[int, int] | None:
        n = len(self._values)
        if self.min_span_seconds:
            return self._split_by_periods(n)
        cur_start, ref_start = n - self.window, n - self.window - self.reference
        return None if ref_start < 0 else (ref_start, cur_start)

    def _split_by_periods(self, n: int) -> tuple[int, int] | None:
        """Current window = the last k whole periods (k: enough for ``window`` values), reference = the k before."""
        t_end = self._times[-1]
        needed = t_end - self._times[max(n - self.window, 0)]
        length = max(1, math.ceil(needed / self.min_span_seconds)) * self.min_span_seconds
        if self._times[0] > t_end - 2 * length:
            return None  # history does not cover two windows of whole periods yet
        cur_start = bisect.bisect_left(self._times, t_end - length)
        ref_start = bisect.bisect_left(self._times, t_end - 2 * length)
        if cur_start - ref_start < 2 or n - cur_start < 2:
            return None
        return ref_start, cur_start

    def _trim_to(self, start: int) -> None:
        if start > 0:
            del self._values[:start], self._times[:start], self._indices[:start]

    @abstractmethod
    def _test(self, reference: list, current: list) -> tuple[float, float, dict] | None:
        """Return ``(statistic, threshold, details)`` when the windows differ enough to call it drift."""

    def _after_detection(self) -> None:
        self._values.clear(), self._times.clear(), self._indices.clear()

    def state(self) -> dict:
        return {**super().state(), "held": len(self._values), "reference": self.reference,
                "window": self.window, "last_statistic": self.last_statistic}


class RateShift(_TwoWindow):
    """A label rate (CTR, conversion) moved: two-proportion z-test, both directions, plus a relative size.

    >>> import numpy as np
    >>> rng = np.random.default_rng(3)
    >>> labels = np.r_[rng.random(10_000) < 0.10, rng.random(5000) < 0.16]
    >>> det = RateShift("m1", "label.ctr", z_threshold=6.0, reference=3000, window=1500)
    >>> fired = [e for i, y in enumerate(labels) if (e := det.update(y, timestamp=float(i)))]
    >>> len(fired), 10_000 <= fired[0].event_index < 12_000
    (1, True)
    """

    family = "label"
    statistic = "z"

    def __init__(self, merchant_id: str, name: str, *, z_threshold: float = CALIBRATED.label_z, min_relative_change: float = 0.2,
                 reference: int = 5000, window: int = 2500, **options) -> None:
        super().__init__(merchant_id, name, reference=reference, window=window, **options)
        self.z_threshold, self.min_relative_change = z_threshold, min_relative_change

    def _test(self, reference: list, current: list):
        n1, n2 = len(reference), len(current)
        k1, k2 = float(np.count_nonzero(reference)), float(np.count_nonzero(current))
        p1, p2, pooled = k1 / n1, k2 / n2, (k1 + k2) / (n1 + n2)
        variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
        z = (p2 - p1) / math.sqrt(variance) if variance > 0 else 0.0
        self.last_statistic = z
        self._measured(abs(z))
        relative = abs(p2 - p1) / max(p1, 1.0 / n1)
        if abs(z) < self.z_threshold or relative < self.min_relative_change:
            return None
        return z, self.z_threshold, {"rate_before": p1, "rate_after": p2, "relative_change": relative}


def psi(reference: np.ndarray, current: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index between two share vectors (same bins): sum (c - r) ln(c / r).

    >>> round(psi(np.array([0.5, 0.5]), np.array([0.5, 0.5])), 6), psi(np.array([0.9, 0.1]), np.array([0.5, 0.5])) > 0.25
    (0.0, True)
    """
    r = np.clip(reference, eps, None)
    c = np.clip(current, eps, None)
    r, c = r / r.sum(), c / c.sum()
    return float(np.sum((c - r) * np.log(c / r)))


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties collapse, so discrete fields get fewer bins)."""
    return np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))


class NumericShift(_TwoWindow):
    """A numeric feature's distribution moved: ``statistic="psi"`` (quantile bins) or ``"ks"`` (scipy).

    KS fires when the distance D exceeds ``ks_threshold`` *and* its p-value is below ``ks_alpha``: large
    windows make tiny, harmless differences significant, so an effect size is required too.

    >>> import numpy as np
    >>> rng = np.random.default_rng(4)
    >>> det = NumericShift("m1", "price", statistic="psi", reference=2000, window=1000)
    >>> [det.update(x, timestamp=0.0) for x in rng.lognormal(3, 0.5, 20_000)].count(None)
    20000
    """

    def __init__(self, merchant_id: str, field: str, *, statistic: Literal["psi", "ks"] = "psi",
                 psi_threshold: float = 0.25, bins: int = 10, ks_threshold: float = CALIBRATED.ks_threshold, ks_alpha: float = 1e-6,
                 name: str | None = None, **window) -> None:
        if statistic not in ("psi", "ks"):
            raise ValueError(f"numeric statistic must be 'psi' or 'ks', got {statistic!r}")
        super().__init__(merchant_id, name or f"feature.{field}.{statistic}", **window)
        self.field, self.statistic = field, statistic
        self.psi_threshold, self.bins = psi_threshold, bins
        self.ks_threshold, self.ks_alpha = ks_threshold, ks_alpha

    def _test(self, reference: list, current: list):
        ref = np.asarray(reference, dtype=float)
        cur = np.asarray(current, dtype=float)
        details = {"mean_before": float(ref.mean()), "mean_after": float(cur.mean())}
        if self.statistic == "ks":
            from scipy.stats import ks_2samp

            result = ks_2samp(ref, cur, method="asymp")
            self.last_statistic = float(result.statistic)
            self._measured(result.statistic)
            if result.statistic < self.ks_threshold or result.pvalue > self.ks_alpha:
                return None
            return float(result.statistic), self.ks_threshold, {**details, "p_value": float(result.pvalue)}
        edges = quantile_edges(ref, self.bins)
        ref_shares = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
        cur_shares = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
        value = psi(ref_shares, cur_shares)
        self.last_statistic = value
        self._measured(value)
        if value < self.psi_threshold:
            return None
        return value, self.psi_threshold, details


class CategoryShift(_TwoWindow):
    """Category shares moved: ``statistic="psi"`` or ``"chi2"`` (p-value below ``chi2_alpha`` and Cramér's V
    above ``min_effect``).

    >>> import numpy as np
    >>> rng = np.random.default_rng(5)
    >>> cats = np.r_[rng.choice(list("abc"), 6000, p=[.6, .3, .1]), rng.choice(list("abc"), 3000, p=[.3, .3, .4])]
    >>> det = CategoryShift("m1", "category", statistic="chi2", reference=2000, window=1000)
    >>> fired = [e for i, c in enumerate(cats) if (e := det.update(c, timestamp=float(i)))]
    >>> len(fired), 6000 <= fired[0].event_index < 7000
    (1, True)
    """

    def __init__(self, merchant_id: str, field: str, *, statistic: Literal["psi", "chi2"] = "chi2",
                 psi_threshold: float = 0.25, chi2_alpha: float = 1e-8, min_effect: float = 0.2,
                 name: str | None = None, **window) -> None:
        if statistic not in ("psi", "chi2"):
            raise ValueError(f"categorical statistic must be 'psi' or 'chi2', got {statistic!r}")
        super().__init__(merchant_id, name or f"feature.{field}.{statistic}", **window)
        self.field, self.statistic = field, statistic
        self.psi_threshold, self.chi2_alpha, self.min_effect = psi_threshold, chi2_alpha, min_effect

    @staticmethod
    def _counts(reference: list[Hashable], current: list[Hashable]) -> tuple[np.ndarray, np.ndarray, list]:
        labels, codes = np.unique(np.asarray([str(v) for v in reference + current]), return_inverse=True)
        ref_counts = np.bincount(codes[: len(reference)], minlength=len(labels))
        cur_counts = np.bincount(codes[len(reference):], minlength=len(labels))
        return ref_counts, cur_counts, labels.tolist()

    def _test(self, reference: list, current: list):
        ref_counts, cur_counts, labels = self._counts(reference, current)
        if self.statistic == "psi":
            value = psi(ref_counts / ref_counts.sum(), cur_counts / cur_counts.sum())
            self.last_statistic = value
            self._measured(value)
            return None if value < self.psi_threshold else (value, self.psi_threshold, {"categories": len(labels)})
        if len(labels) < 2:
            self.last_statistic = 0.0
            return None
        from scipy.stats import chi2_contingency

        chi2, p_value, _, _ = chi2_contingency(np.vstack([ref_counts, cur_counts]), correction=False)
        cramers_v = math.sqrt(chi2 / (ref_counts.sum() + cur_counts.sum()))
        self.last_statistic = float(chi2)
        self._measured(cramers_v)  # the calibrated gate is the effect size (the p-value is tiny at these sizes)
        if p_value > self.chi2_alpha or cramers_v < self.min_effect:
            return None
        return float(chi2), self.chi2_alpha, {"p_value": float(p_value), "cramers_v": cramers_v,
                                              "categories": len(labels)}
