"""The one registry of drift detectors: each entry declares what it watches, how it is built, which settings it reads.

``build_detectors``, the monitor's routing (:class:`Signal` -> detectors), calibration
(``threshold``: the setting it sets) and ``fedstream drift detectors`` all read :data:`DETECTORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from drift.detectors.base import Detector
from drift.detectors.errors import ErrorADWIN, ErrorPageHinkley
from drift.detectors.price import PriceIndex
from drift.detectors.taste import TasteShift
from drift.detectors.windows import CategoryShift, NumericShift, RateShift
from drift.traffic import ArrivalRate
from fedstream.settings import DriftSettings


class Signal(str, Enum):
    """What a detector watches: the value the monitor feeds it, per merchant (see ``DriftMonitor._signals``)."""

    ERROR = "error"  # prequential error of each prediction (float)
    EVENT = "event"  # every click or order (None): its timestamp is the value
    CLICK = "click"  # every impression: clicked or not (bool)
    CONVERSION = "conversion"  # a clicked impression (False) or an order (True)
    PRICE = "price"  # price of each shown item
    ITEM_PRICE = "item_price"  # (item id, price) of each shown item
    HOUR = "hour"  # hour of day (UTC) of each session's first event
    DEVICE = "device"  # device of each session
    CATEGORY = "category"  # category of each clicked or ordered item
    CATEGORY_CHOICE = "category_choice"  # (user, category, session): a category the user chose on a page view


Builder = Callable[[DriftSettings, str, dict], Detector]  # (settings, merchant, shared options) -> detector


@dataclass(frozen=True)
class DetectorSpec:
    """One detector: the signal it watches, its builder, the setting calibration sets (field, per-field key),
    the other settings it reads, the switch (beyond ``disabled``) that turns it on, a one-line summary, and
    a threshold its statistic can never reach (calibration records peaks under it)."""

    watches: Signal
    build: Builder
    threshold: tuple[str, str | None]
    settings: tuple[str, ...] = ()
    enabled: Callable[[DriftSettings], bool] = lambda config: True
    summary: str = ""
    out_of_reach: float = 1e12


def _error_options(config: DriftSettings, common: dict) -> dict:
    return {**common, "warmup": config.warmup_events, "chunk": config.error_chunk}


def _adwin(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
    return ErrorADWIN(merchant_id, delta=config.adwin_delta, clock=config.adwin_clock,
                      min_increase=config.adwin_min_increase, **_error_options(config, common))


def _page_hinkley(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
    return ErrorPageHinkley(merchant_id, threshold=config.ph_threshold, delta=config.ph_delta, alpha=config.ph_alpha,
                            min_instances=config.ph_min_instances, **_error_options(config, common))


def _label(name: str) -> Builder:
    def build(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
        # click rates follow the hour of day: label windows are whole days, compared day(s) against day(s)
        return RateShift(merchant_id, name, z_threshold=config.label_z,
                         min_relative_change=config.label_min_relative_change, reference=config.label_reference,
                         window=config.label_window, check_every=config.check_every,
                         min_span_seconds=config.hour_period_seconds, **common)
    return build


def _windows(config: DriftSettings, per_session: bool) -> dict:
    """Window options of feature tests; per-session fields (hour, device) count sessions over whole days."""
    window = config.session_window if per_session else config.feature_window
    return dict(reference=config.feature_reference, window=window, check_every=config.check_every,
                min_span_seconds=config.hour_period_seconds if per_session else 0.0)


def _numeric(field: str, statistic: str, per_session: bool) -> Builder:
    def build(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
        return NumericShift(merchant_id, field, statistic=statistic,
                            psi_threshold=config.psi_thresholds.get(field, config.psi_threshold), bins=config.psi_bins,
                            ks_threshold=config.ks_threshold, ks_alpha=config.ks_alpha,
                            **_windows(config, per_session), **common)
    return build


def _categorical(field: str, statistic: str, per_session: bool) -> Builder:
    def build(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
        return CategoryShift(merchant_id, field, statistic=statistic,
                             psi_threshold=config.psi_thresholds.get(field, config.psi_threshold),
                             chi2_alpha=config.chi2_alpha,
                             min_effect=config.chi2_min_effects.get(field, config.chi2_min_effect),
                             **_windows(config, per_session), **common)
    return build


def _price_index(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
    return PriceIndex(merchant_id, "feature.price.index", threshold=config.price_index_threshold,
                      window=config.price_index_window, check_every=min(config.check_every, config.price_index_window),
                      max_items=config.price_index_max_items, **common)


def _taste(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
    # its own re-arming is its cool-down: after firing it needs min_reference new scores and a new climb
    return TasteShift(merchant_id, "feature.user_category.cusum", slack=config.user_category_slack,
                      threshold=config.user_category_threshold, min_reference=config.user_category_min_reference,
                      reference=max(config.user_category_reference, config.user_category_min_reference),
                      lag=config.user_category_lag, max_users=config.user_category_max_users,
                      model_version=common["model_version"])


def _rate(config: DriftSettings, merchant_id: str, common: dict) -> Detector:
    return ArrivalRate(merchant_id, "traffic.rate", threshold=config.rate_threshold,
                       period_seconds=config.hour_period_seconds, window=config.rate_window_periods,
                       reference=config.rate_reference_periods, min_count=config.rate_min_count, **common)


_ERROR = ("warmup_events", "error_chunk", "error_metric", "error_clip", "cooldown_events")
_LABEL = ("label_reference", "label_window", "label_min_relative_change", "check_every", "hour_period_seconds",
          "cooldown_events")
_FEATURE = ("feature_reference", "feature_window", "check_every", "cooldown_events")


def _feature(field: str, statistic: str, watches: Signal, *, numeric: bool, per_session: bool) -> DetectorSpec:
    """A window test of one feature field (numeric: PSI / KS; categorical: PSI / chi-squared)."""
    kind = "numeric_fields" if numeric else "categorical_fields"
    extra = {"psi": ("psi_threshold", "psi_bins") if numeric else ("psi_threshold",),
             "ks": ("ks_alpha",), "chi2": ("chi2_alpha", "chi2_min_effect")}[statistic]
    threshold = ("ks_threshold", None) if statistic == "ks" else (
        ("psi_thresholds" if statistic == "psi" else "chi2_min_effects"), field)
    settings = (kind, *extra, *_FEATURE, *(("session_window", "hour_period_seconds") if per_session else ()))
    build = (_numeric if numeric else _categorical)(field, statistic, per_session)
    summary = (f"{field} {'distribution' if numeric else 'shares'}, {statistic}"
               + (", one value per session, day-aligned windows" if per_session else ""))
    # KS distance is at most 1 and fires only at D >= threshold: 1.0 is out of reach (and a valid setting)
    return DetectorSpec(watches, build, threshold, settings, lambda config: field in getattr(config, kind), summary,
                        1.0 if statistic == "ks" else 1e12)


# declaration order is feeding order among detectors watching one signal (and the order of their events)
DETECTORS: dict[str, DetectorSpec] = {
    "error.adwin": DetectorSpec(Signal.ERROR, _adwin, ("adwin_min_increase", None),
                                ("adwin_delta", "adwin_clock", *_ERROR), summary="rise of the prequential error, ADWIN"),
    "error.page_hinkley": DetectorSpec(Signal.ERROR, _page_hinkley, ("ph_threshold", None),
                                       ("ph_delta", "ph_alpha", "ph_min_instances", *_ERROR),
                                       summary="rise of the prequential error, River Page-Hinkley on chunk sums"),
    "label.ctr": DetectorSpec(Signal.CLICK, _label("label.ctr"), ("label_z", None), _LABEL,
                              summary="click rate, two-proportion z, day-aligned windows"),
    "label.conversion": DetectorSpec(Signal.CONVERSION, _label("label.conversion"), ("label_z", None), _LABEL,
                                     summary="conversion rate of clicks, two-proportion z, day-aligned windows"),
    "feature.price.psi": _feature("price", "psi", Signal.PRICE, numeric=True, per_session=False),
    "feature.price.ks": _feature("price", "ks", Signal.PRICE, numeric=True, per_session=False),
    "feature.hour.psi": _feature("hour", "psi", Signal.HOUR, numeric=True, per_session=True),
    "feature.hour.ks": _feature("hour", "ks", Signal.HOUR, numeric=True, per_session=True),
    "feature.price.index": DetectorSpec(
        Signal.ITEM_PRICE, _price_index, ("price_index_threshold", None),
        ("numeric_fields", "price_index", "price_index_window", "price_index_max_items", "check_every",
         "cooldown_events"),
        lambda config: "price" in config.numeric_fields and config.price_index,
        "median log price ratio of the same items"),
    "feature.category.psi": _feature("category", "psi", Signal.CATEGORY, numeric=False, per_session=False),
    "feature.category.chi2": _feature("category", "chi2", Signal.CATEGORY, numeric=False, per_session=False),
    "feature.device.psi": _feature("device", "psi", Signal.DEVICE, numeric=False, per_session=True),
    "feature.device.chi2": _feature("device", "chi2", Signal.DEVICE, numeric=False, per_session=True),
    "feature.user_category.cusum": DetectorSpec(
        Signal.CATEGORY_CHOICE, _taste, ("user_category_threshold", None),
        ("user_category", "user_category_pages", "user_category_slack", "user_category_min_reference",
         "user_category_reference", "user_category_lag", "user_category_max_users"),
        lambda config: config.user_category,
        "users choosing categories their own history does not predict (tastes), CUSUM"),
    "traffic.rate": DetectorSpec(
        Signal.EVENT, _rate, ("rate_threshold", None),
        ("traffic_rate", "hour_period_seconds", "rate_window_periods", "rate_reference_periods", "rate_min_count",
         "cooldown_events"),
        lambda config: config.traffic_rate, "events per period, recent periods vs the ones before"),
}


def watchers(signal: Signal) -> tuple[str, ...]:
    """Names of the detectors that watch ``signal``, in declaration order."""
    return _WATCHERS.get(signal, ())


_WATCHERS: dict[Signal, tuple[str, ...]] = {
    signal: tuple(name for name, spec in DETECTORS.items() if spec.watches is signal) for signal in Signal}


def build_detectors(config: DriftSettings, merchant_id: str, model_version: str | None = None,
                    signals: frozenset[Signal] | None = None) -> dict[str, Detector]:
    """Every detector of :data:`DETECTORS` that is switched on and not in ``config.disabled``, for one merchant;
    only those watching one of ``signals`` when given (the ones a monitor is fed).

    >>> from fedstream.settings import DriftSettings
    >>> sorted(build_detectors(DriftSettings(), "m1"))[:4]
    ['error.page_hinkley', 'feature.category.chi2', 'feature.category.psi', 'feature.device.chi2']
    >>> list(build_detectors(DriftSettings(), "m1", signals=frozenset({Signal.ERROR})))
    ['error.page_hinkley']
    """
    unknown = sorted(set(config.disabled) - DETECTORS.keys())
    if unknown:
        raise ValueError(f"drift.disabled names unknown detectors {unknown}; known: {sorted(DETECTORS)}")
    common = dict(model_version=model_version, cooldown=config.cooldown_events)
    return {name: spec.build(config, merchant_id, common) for name, spec in DETECTORS.items()
            if name not in config.disabled and spec.enabled(config) and (signals is None or spec.watches in signals)}
