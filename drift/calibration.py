"""Threshold calibration on drift-free streams: the documented rule behind ``settings.drift`` defaults.

Rule: run every detector with thresholds it can never cross (:data:`NEVER_FIRE`) over drift-free
*calibration* streams; each detector records :attr:`~drift.detectors.Detector.peak`, the largest value of
the statistic it compares with its threshold (after warm-up); the threshold becomes ``FACTOR`` (1.4) x the
highest peak over all calibration streams and merchants. Detectors that share a setting (``label_z`` for
both label rates, ``ks_threshold`` for price and hour) take the larger peak. Secondary gates (p-values,
the relative rate change) stay as they are. A detector that produced no statistic keeps its default.
``benchmarks/drift.py --calibrate`` runs this on its calibration seeds and prints the result; the
benchmark's report mode then measures the defaults on *other* (held-out) seeds.

Example:
    >>> from fedstream.settings import DriftSettings
    >>> setting_for("feature.price.psi"), setting_for("label.ctr"), setting_for("feature.device.chi2")
    (('psi_thresholds', 'price'), ('label_z', None), ('chi2_min_effects', 'device'))
    >>> thresholds({"error.page_hinkley": 100.0, "label.ctr": 3.0, "label.conversion": 4.0}, DriftSettings())
    {'label_z': 5.6, 'ph_threshold': 140.0}
"""

from __future__ import annotations

from collections.abc import Iterable

from drift.detectors.registry import DETECTORS
from fedstream.settings import DriftSettings

FACTOR = 1.4


def setting_for(detector: str) -> tuple[str, str | None]:
    """The ``DriftSettings`` field (and dict key, for per-field thresholds) that sets a detector's threshold,
    as the detector's registry entry declares it."""
    if detector not in DETECTORS:
        raise KeyError(f"no calibrated threshold for detector {detector!r}")
    return DETECTORS[detector].threshold


def _never_fire() -> dict[str, object]:
    """Every registered detector on, each threshold at its declared out-of-reach value."""
    update: dict[str, object] = {"disabled": ()}
    for spec in DETECTORS.values():
        field, key = spec.threshold
        if key is None:
            update[field] = spec.out_of_reach
        else:
            update[field] = {**update.get(field, {}), key: spec.out_of_reach}
    return update


# settings under which every detector runs and none can fire
NEVER_FIRE: dict[str, object] = _never_fire()


def never_fire(config: DriftSettings) -> DriftSettings:
    """``config`` with every calibrated threshold out of reach (detectors then only record their peaks)."""
    return config.model_copy(update=NEVER_FIRE)


def peaks(detector_sets: Iterable[dict]) -> dict[str, float]:
    """The highest :attr:`peak` per detector name over merchants (``DriftMonitor.detectors.values()``)."""
    found: dict[str, float] = {}
    for detectors in detector_sets:
        for name, detector in detectors.items():
            found[name] = max(found.get(name, 0.0), detector.peak)
    return found


def thresholds(peak_by_detector: dict[str, float], config: DriftSettings, factor: float = FACTOR) -> dict:
    """Settings updates by the rule (``factor`` x the highest peak per setting); no peak -> no update."""
    highest: dict[tuple[str, str | None], float] = {}
    for name, value in peak_by_detector.items():
        key = setting_for(name)
        highest[key] = max(highest.get(key, 0.0), value)
    updates: dict = {}
    for (field, key), value in sorted(highest.items(), key=lambda item: (item[0][0], item[0][1] or "")):
        if value <= 0:
            continue  # never measured: keep the default
        rounded = float(f"{factor * value:.3g}")
        if key is None:
            updates[field] = rounded
        else:
            updates.setdefault(field, dict(getattr(config, field)))[key] = rounded
    return updates
