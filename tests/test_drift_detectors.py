"""Drift detectors: fire once on a known, seeded shift; stay quiet on stationary streams; reject bad input."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from drift.detectors import (
    CategoryShift,
    ErrorADWIN,
    ErrorPageHinkley,
    NumericShift,
    PriceIndex,
    RateShift,
    TasteShift,
    build_detectors,
    prequential_error,
    psi,
)
from drift.events import DriftEvent, decode_drift_event, encode_drift_event
from fedstream.settings import DriftSettings, load_settings

SHIFT = 20_000
N = 40_000


def run(detector, values, timestamps=None):
    timestamps = np.arange(len(values), dtype=float) if timestamps is None else timestamps
    return [e for i, v in enumerate(values) if (e := detector.update(v, timestamp=float(timestamps[i]))) is not None]


def streams(kind: str, shifted: bool, seed: int):
    """Seeded value streams; with ``shifted`` the distribution changes at SHIFT."""
    rng = np.random.default_rng(seed)
    after = N - SHIFT
    if kind == "error":
        base = rng.exponential(0.4, N)
        if shifted:
            base[SHIFT:] = rng.exponential(0.55, after)
        return base
    if kind == "rate":
        rate = np.full(N, 0.1)
        if shifted:
            rate[SHIFT:] = 0.15
        return rng.random(N) < rate
    if kind == "taste":  # (user, category) choices: 500 users, each favouring one of 6 categories half the time
        favourite = rng.integers(0, 6, 500)
        users = rng.integers(0, 500, N)
        liked = (favourite[users] + (shifted & (np.arange(N) >= SHIFT))) % 6  # the shift: every taste moves on
        categories = np.where(rng.random(N) < 0.5, liked, rng.integers(0, 6, N))
        return [(f"u{u}", f"c{c}") for u, c in zip(users.tolist(), categories.tolist())]
    if kind == "catalog":  # (item, price) impressions; a tenth of the items is on a -30% promotion half the time
        base = rng.lognormal(3.0, 0.6, 400)
        items = rng.integers(0, 400, N)
        promoted = (items % 10 == 0) & (np.arange(N) // 3000 % 2 == 1)
        prices = base[items] * np.where(promoted, 0.7, 1.0)
        if shifted:  # the shift: the merchant re-prices everything by +15..45%
            prices[SHIFT:] *= np.exp(rng.normal(0.3, 0.1, 400))[items[SHIFT:]]
        return [(f"i{i}", float(x)) for i, x in zip(items.tolist(), prices.tolist())]
    if kind == "numeric":
        values = rng.lognormal(3.0, 0.6, N)
        if shifted:
            values[SHIFT:] *= 1.5
        return values
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    values = rng.choice(list("abcd"), N, p=shares)
    if shifted:
        values[SHIFT:] = rng.choice(list("abcd"), after, p=[0.25, 0.25, 0.25, 0.25])
    return values


DETECTORS = {
    "error.adwin": (lambda: ErrorADWIN("m1", warmup=0), "error"),
    "error.page_hinkley": (lambda: ErrorPageHinkley("m1", threshold=80, delta=0.05, warmup=0), "error"),
    "label.ctr": (lambda: RateShift("m1", "label.ctr", z_threshold=5.0), "rate"),
    "feature.price.psi": (lambda: NumericShift("m1", "price", statistic="psi"), "numeric"),
    "feature.price.ks": (lambda: NumericShift("m1", "price", statistic="ks", ks_threshold=0.15), "numeric"),
    "feature.category.psi": (lambda: CategoryShift("m1", "category", statistic="psi"), "category"),
    "feature.category.chi2": (lambda: CategoryShift("m1", "category", statistic="chi2"), "category"),
    "feature.user_category.cusum": (lambda: TasteShift("m1", threshold=30.0), "taste"),
    "feature.price.index": (lambda: PriceIndex("m1"), "catalog"),
}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_fires_once_soon_after_a_known_shift(name):
    make, kind = DETECTORS[name]
    fired = run(make(), streams(kind, shifted=True, seed=11))
    assert len(fired) == 1, [(e.event_index, e.value) for e in fired]
    event = fired[0]
    assert SHIFT <= event.event_index < SHIFT + 5000
    assert event.detector == name and event.merchant_id == "m1"
    assert event.window_start_index <= event.window_end_index == event.event_index
    assert event.window_start_time <= event.window_end_time


@pytest.mark.parametrize("name", sorted(DETECTORS))
@pytest.mark.parametrize("seed", [1, 2])
def test_detector_stays_quiet_on_a_stationary_stream(name, seed):
    make, kind = DETECTORS[name]
    assert run(make(), streams(kind, shifted=False, seed=seed)) == []


@pytest.mark.parametrize("make", [DETECTORS["error.adwin"][0], DETECTORS["error.page_hinkley"][0]])
def test_error_detectors_ignore_an_improving_model(make):
    rng = np.random.default_rng(5)
    errors = np.r_[rng.exponential(0.6, SHIFT), rng.exponential(0.3, SHIFT)]
    assert run(make(), errors) == []


@pytest.mark.parametrize("make", [
    lambda: ErrorADWIN("m1", warmup=300, cooldown=2000, chunk=16),
    lambda: ErrorPageHinkley("m1", threshold=80, delta=0.05, warmup=300, cooldown=2000, chunk=16),
])
def test_error_detectors_in_blocks_equal_one_at_a_time_whatever_the_block_boundaries(make):
    """The worker feeds blocks whose boundaries depend on timing; detections and state must not."""
    errors = streams("error", shifted=True, seed=11).tolist()
    stamps = np.arange(len(errors), dtype=float) + 1.7e9
    single = make()
    expected = [(i, e) for i, x in enumerate(errors)
                if (e := single.update(x, timestamp=float(stamps[i]), index=i)) is not None]
    assert expected and SHIFT <= expected[0][0]
    sizes = np.random.default_rng(3).integers(1, 300, len(errors))
    blocked, found, start = make(), [], 0
    for size in sizes.tolist():
        block = slice(start, min(start + size, len(errors)))
        found += [(start + k, e) for k, e in blocked.update_many(errors[block], stamps[block], range(block.start, block.stop))]
        start = block.stop
        if start == len(errors):
            break
    strip = lambda pairs: [(i, msgspec.structs.replace(e, detected_at=0.0)) for i, e in pairs]  # noqa: E731
    assert strip(found) == strip(expected)
    assert blocked.state() == single.state()
    assert blocked.state()["n_seen"] == len(errors) and blocked.state()["pending"] < 16


def test_taste_shift_ignores_users_growing_more_predictable_and_keeps_bounded_state():
    rng = np.random.default_rng(8)
    favourite = rng.integers(0, 6, 800)
    users = rng.integers(0, 800, N)
    share = np.where(np.arange(N) < SHIFT, 0.3, 0.7)  # choices follow the favourite more often: not a drift
    categories = np.where(rng.random(N) < share, favourite[users], rng.integers(0, 6, N))
    detector = TasteShift("m1", threshold=30.0, max_users=300, history_cap=8)
    assert run(detector, [(f"u{u}", f"c{c}") for u, c in zip(users.tolist(), categories.tolist())]) == []
    state = detector.state()
    assert state["users"] == 300 and state["armed"] and state["reference_size"] == 3000
    assert state["n_seen"] == N and state["scores"] < N  # users evicted from the LRU start without a history
    assert all(sum(history.values()) <= 8 for history, _, _ in detector.users.values())
    assert detector.score("nobody", "c1") is None


def test_taste_shift_scores_against_earlier_sessions_only():
    """Choices of the open session are not history yet: a session agrees with itself whatever the tastes."""
    detector = TasteShift("m1", threshold=30.0)
    detector.update(("u1", "shoes", "s1"), timestamp=0.0)
    detector.update(("u1", "shoes", "s1"), timestamp=1.0)
    assert detector.score("u1", "shoes") is None  # only the open session so far
    detector.update(("u1", "bags", "s2"), timestamp=2.0)  # a new session commits s1
    assert detector.users["u1"][0] == {"shoes": 2.0}
    assert detector.score("u1", "shoes") > 0 > detector.score("u1", "bags")
    detector.update(("u2", "hats"), timestamp=3.0)  # no session given: history at once
    assert detector.score("u2", "hats") > 0


def test_taste_shift_event_dates_the_change_and_rearms_after_firing():
    detector = TasteShift("m1", threshold=30.0)
    fired = run(detector, streams("taste", shifted=True, seed=12))
    assert len(fired) == 1
    event = fired[0]
    assert SHIFT - 300 <= event.window_start_index <= event.event_index < SHIFT + 1000
    assert event.value > event.threshold == 30.0
    assert event.details["mean_since_change"] < event.details["reference_mean"]
    assert detector.state()["armed"] and detector.cusum < 30.0  # re-armed on the new regime, quiet since


def test_price_index_rereferences_after_firing_and_ignores_broken_prices():
    detector = PriceIndex("m1")
    fired = run(detector, streams("catalog", shifted=True, seed=13))
    assert len(fired) == 1 and fired[0].value > 0.15 and fired[0].details["changed_share"] > 0.5
    assert SHIFT - 200 <= fired[0].window_start_index <= SHIFT <= fired[0].event_index < SHIFT + 400  # 200: the window
    assert detector.state()["items"] == 400  # re-referenced at the new prices: quiet after firing
    bounded = PriceIndex("m1", max_items=100)
    run(bounded, streams("catalog", shifted=False, seed=13)[:5000])
    assert bounded.state()["items"] == 100  # oldest references forgotten first
    assert detector.update(("i1", 0.0), timestamp=0.0) is None and detector.update(("i1", float("nan")), timestamp=0.0) is None


def test_hour_of_day_cycle_is_not_drift_when_windows_span_whole_days():
    """Events every 60 s with a strong daily cycle: count windows see drift, day-long windows do not."""
    rng = np.random.default_rng(3)
    times = 1_700_000_000.0 + np.arange(30_000) * 60.0
    hours = ((times // 3600) % 24).astype(int)
    keep = rng.random(len(hours)) < 0.5 + 0.4 * np.sin(hours / 24 * 2 * np.pi)
    times, hours = times[keep], hours[keep]
    by_count = NumericShift("m1", "hour", statistic="ks", ks_threshold=0.15, reference=1000, window=500)
    by_day = NumericShift("m1", "hour", statistic="ks", ks_threshold=0.15, reference=1000, window=500,
                          min_span_seconds=86_400)
    assert run(by_count, hours, times) != []
    assert run(by_day, hours, times) == []
    state = by_day.state()
    assert state["n_seen"] == len(hours) and state["n_detections"] == 0


def test_cooldown_and_state_are_inspectable():
    detector = RateShift("m1", "label.ctr", z_threshold=5.0, cooldown=10_000)
    fired = run(detector, streams("rate", shifted=True, seed=11))
    state = detector.state()
    assert state["n_detections"] == len(fired) == 1
    assert state["quiet_until"] > fired[0].event_index
    assert detector.last_event == fired[0]
    assert fired[0].details["rate_after"] > fired[0].details["rate_before"]


def test_bad_parameters_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="numeric statistic"):
        NumericShift("m1", "price", statistic="chi2")
    with pytest.raises(ValueError, match="categorical statistic"):
        CategoryShift("m1", "category", statistic="ks")
    with pytest.raises(ValueError, match="at least 2 values"):
        RateShift("m1", "label.ctr", reference=1, window=10)
    with pytest.raises(ValueError, match="threshold, clip and prior"):
        TasteShift("m1", threshold=0)
    with pytest.raises(ValueError, match="min_reference <= reference"):
        TasteShift("m1", min_reference=500, reference=100)
    with pytest.raises(ValueError, match="window >= 2"):
        PriceIndex("m1", window=1)
    with pytest.raises(ValueError, match="unknown error metric"):
        prequential_error(1, 0.5, "hinge")


def test_prequential_error_and_psi_basics():
    assert prequential_error(1, 1.0, "logloss") == pytest.approx(-np.log(1 - 1e-3))  # clipped, never infinite
    assert prequential_error(1, 0.01) > 0 > prequential_error(0, 0.3)  # excess over the model's own entropy
    assert prequential_error(0, 0.2, "zero_one") == 0.0
    assert psi(np.array([0.25] * 4), np.array([0.25] * 4)) == pytest.approx(0.0)
    assert psi(np.array([0.7, 0.3]), np.array([0.3, 0.7])) > 0.25


def test_detectors_are_built_from_settings_including_env_overrides(monkeypatch):
    monkeypatch.setenv("FEDSTREAM_DRIFT__PH_THRESHOLD", "123.5")
    monkeypatch.setenv("FEDSTREAM_DRIFT__NUMERIC_FIELDS", '["price"]')
    monkeypatch.setenv("FEDSTREAM_DRIFT__PSI_THRESHOLDS", '{"price": 0.1}')
    config = load_settings().drift
    detectors = build_detectors(config, "m7", model_version="4")
    assert detectors["feature.price.psi"].psi_threshold == 0.1
    assert detectors["feature.category.psi"].psi_threshold == config.psi_threshold
    assert detectors["error.page_hinkley"].ph.threshold == 123.5
    assert "feature.hour.ks" not in detectors and "feature.price.ks" in detectors
    assert {d.model_version for d in detectors.values()} == {"4"}
    assert detectors["feature.price.ks"].merchant_id == "m7"
    assert DriftSettings().cooldown_events > 0
    assert detectors["feature.user_category.cusum"].threshold == config.user_category_threshold
    assert detectors["feature.price.index"].threshold == config.price_index_threshold
    assert "error.adwin" not in detectors and "traffic.rate" in detectors
    monkeypatch.setenv("FEDSTREAM_DRIFT__DISABLED", '["label.ctr"]')
    again = build_detectors(load_settings().drift, "m7")
    assert again["error.adwin"].chunk == config.error_chunk and "label.ctr" not in again
    monkeypatch.setenv("FEDSTREAM_DRIFT__USER_CATEGORY", "false")
    assert "feature.user_category.cusum" not in build_detectors(load_settings().drift, "m7")


def test_drift_event_round_trips_and_rejects_garbage():
    event = DriftEvent(merchant_id="m1", detector="error.adwin", statistic="mean_error_increase", value=0.3,
                       threshold=0.05, window_start_index=1, window_end_index=9, window_start_time=1.0,
                       window_end_time=9.0, event_index=9, model_version="2", details={"mean_before": 0.4})
    assert decode_drift_event(encode_drift_event(event)) == event
    with pytest.raises(msgspec.ValidationError):
        decode_drift_event(b'{"merchant_id": "m1"}')
    with pytest.raises(msgspec.DecodeError):
        decode_drift_event(b"not json")


@pytest.mark.parametrize("module", ["drift.calibration", "drift.detectors", "drift.events", "drift.monitor",
                                    "drift.prequential", "drift.report", "drift.synthetic", "drift.traffic"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
