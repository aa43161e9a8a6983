"""Drift detectors for one merchant's streams, all with the same small interface.

``detector.update(value, timestamp=..., index=...) -> DriftEvent | None``: feed one value, get an event
back on the update where the detector decides the stream changed. ``state()`` shows what it holds.

Three families, named by what they watch:

* ``error.*`` — the prequential error of the serving model (per-event logloss or 0/1 error, see
  :func:`prequential_error`). River's ADWIN and PageHinkley; only *rises* in error count as drift (a model
  that gets better is not a problem). River's FHDDM is not used: it flags drops of its input.
* ``label.*`` — label rates (click-through, conversion) with a two-window, two-proportion z-test.
* ``feature.<field>.*`` — a feature's distribution: PSI and Kolmogorov-Smirnov for numeric fields (price,
  hour of day), PSI and chi-squared for category shares, reference window vs current window;
  ``feature.user_category.cusum`` — category shares *per user*: how well each user's own history predicts
  the categories they choose (:class:`TasteShift`), the one that sees a change of tastes.

Window tests compare the current window (the last ``window`` values) with the reference window just
before it (the ``reference`` values preceding it); a ``min_span_seconds`` stretches both windows to cover
whole periods of event time, so the hour of day is compared day(s) against day(s) and its daily cycle is
not reported as drift. After a detector fires it forgets the old regime and stays quiet for ``cooldown``
values, so one change is reported once.

Thresholds (``settings.drift``) come from one documented rule applied on drift-free calibration streams
only (:mod:`drift.calibration`: 1.4x the highest statistic seen; ``benchmarks/drift.py --calibrate``);
the benchmark reports false alarms and power on other, held-out seeds (``drift/README.md``). The
generator's traffic comes in sessions (a session's impressions share user, page category and hour), so
events are far from independent and textbook p-values alone fire every day: hence effect-size gates (PSI,
KS distance, Cramér's V, relative rate change) on top of p-values, one hour and device value per session,
day-aligned windows for the hour, device and label rates. Price changes are caught by
``feature.price.index`` (same items, new prices); a taste change the online model re-learns within ~1k
events barely moves the error or the platform-wide shares, which ``feature.user_category.cusum`` sees;
``traffic.rate`` (:mod:`drift.traffic`) sees traffic collapse or surge.

Example (a seeded stream whose mean jumps at value 5000):
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> stream = np.r_[rng.normal(10, 2, 5000), rng.normal(13, 2, 5000)]
    >>> detector = NumericShift("m1", "price", statistic="ks", reference=1000, window=500)
    >>> fired = [e for i, x in enumerate(stream) if (e := detector.update(x, timestamp=float(i)))]
    >>> len(fired), 5000 <= fired[0].event_index < 5500
    (1, True)
"""

from __future__ import annotations

from drift.detectors.base import Detector, _Trail, prequential_error, prequential_errors  # noqa: F401
from drift.detectors.errors import ErrorADWIN, ErrorPageHinkley, _ChunkedError  # noqa: F401
from drift.detectors.windows import CategoryShift, NumericShift, RateShift, _TwoWindow, psi, quantile_edges  # noqa: F401
from drift.detectors.price import PriceIndex  # noqa: F401
from drift.detectors.taste import TasteShift  # noqa: F401
from fedstream.settings import DriftSettings


ERROR_DETECTORS = ("error.adwin", "error.page_hinkley")
LABEL_DETECTORS = ("label.ctr", "label.conversion")
TASTE_DETECTOR = "feature.user_category.cusum"
PRICE_INDEX_DETECTOR = "feature.price.index"
RATE_DETECTOR = "traffic.rate"


def build_detectors(config: DriftSettings, merchant_id: str, model_version: str | None = None) -> dict[str, Detector]:
    """Every detector for one merchant, named ``family.field.statistic``, configured from settings.

    >>> from fedstream.settings import DriftSettings
    >>> sorted(build_detectors(DriftSettings(), "m1"))[:4]
    ['error.page_hinkley', 'feature.category.chi2', 'feature.category.psi', 'feature.device.chi2']
    """
    common = dict(model_version=model_version, cooldown=config.cooldown_events)
    error_common = {**common, "warmup": config.warmup_events, "chunk": config.error_chunk}
    detectors: dict[str, Detector] = {
        "error.adwin": ErrorADWIN(merchant_id, delta=config.adwin_delta, clock=config.adwin_clock,
                                  min_increase=config.adwin_min_increase, **error_common),
        "error.page_hinkley": ErrorPageHinkley(merchant_id, threshold=config.ph_threshold, delta=config.ph_delta,
                                               alpha=config.ph_alpha, min_instances=config.ph_min_instances,
                                               **error_common),
    }
    # click rates follow the hour of day: label windows are whole days, compared day(s) against day(s)
    label_window = dict(reference=config.label_reference, window=config.label_window,
                        check_every=config.check_every, min_span_seconds=config.hour_period_seconds, **common)
    for name in LABEL_DETECTORS:
        detectors[name] = RateShift(merchant_id, name, z_threshold=config.label_z,
                                    min_relative_change=config.label_min_relative_change, **label_window)
    feature_window = dict(reference=config.feature_reference, window=config.feature_window,
                          check_every=config.check_every, **common)
    per_session = {**feature_window, "window": config.session_window}  # hour, device: one value per session
    for field in config.numeric_fields:
        span = config.hour_period_seconds if field == "hour" else 0.0
        windows = per_session if field == "hour" else feature_window
        psi_threshold = config.psi_thresholds.get(field, config.psi_threshold)
        for statistic in ("psi", "ks"):
            detectors[f"feature.{field}.{statistic}"] = NumericShift(
                merchant_id, field, statistic=statistic, psi_threshold=psi_threshold, bins=config.psi_bins,
                ks_threshold=config.ks_threshold, ks_alpha=config.ks_alpha, min_span_seconds=span, **windows)
    if "price" in config.numeric_fields and config.price_index:
        detectors[PRICE_INDEX_DETECTOR] = PriceIndex(
            merchant_id, PRICE_INDEX_DETECTOR, threshold=config.price_index_threshold, window=config.price_index_window,
            check_every=min(config.check_every, config.price_index_window), max_items=config.price_index_max_items,
            **common)
    for field in config.categorical_fields:
        psi_threshold = config.psi_thresholds.get(field, config.psi_threshold)
        span = config.hour_period_seconds if field == "device" else 0.0  # devices follow the hour of day
        windows = per_session if field == "device" else feature_window
        for statistic in ("psi", "chi2"):
            detectors[f"feature.{field}.{statistic}"] = CategoryShift(
                merchant_id, field, statistic=statistic, psi_threshold=psi_threshold, chi2_alpha=config.chi2_alpha,
                min_effect=config.chi2_min_effects.get(field, config.chi2_min_effect), min_span_seconds=span,
                **windows)
    if config.user_category:
        # its own re-arming is its cool-down: after firing it needs min_reference new scores and a new climb
        detectors[TASTE_DETECTOR] = TasteShift(
            merchant_id, TASTE_DETECTOR, slack=config.user_category_slack, threshold=config.user_category_threshold,
            min_reference=config.user_category_min_reference,
            reference=max(config.user_category_reference, config.user_category_min_reference),
            lag=config.user_category_lag, max_users=config.user_category_max_users, model_version=model_version)
    if config.traffic_rate:
        from drift.traffic import ArrivalRate

        detectors[RATE_DETECTOR] = ArrivalRate(
            merchant_id, RATE_DETECTOR, threshold=config.rate_threshold, period_seconds=config.hour_period_seconds,
            window=config.rate_window_periods, reference=config.rate_reference_periods,
            min_count=config.rate_min_count, **common)
    return {name: detector for name, detector in detectors.items() if name not in config.disabled}
