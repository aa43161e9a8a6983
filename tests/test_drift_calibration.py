"""Threshold calibration (peaks on drift-free streams, the 1.4x rule), the traffic-rate detector, device shares."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from drift.calibration import FACTOR, NEVER_FIRE, never_fire, peaks, setting_for, thresholds
from drift.detectors import ErrorPageHinkley, RateShift, build_detectors
from drift.monitor import DriftMonitor
from drift.synthetic import synthetic_events
from drift.traffic import ArrivalRate
from fedstream.settings import DriftSettings, load_settings
from streams.schemas import Click


def _settings(**drift):
    settings = load_settings(data_dir=tempfile.mkdtemp(prefix="drift-cal-"))
    return settings.model_copy(update={"drift": settings.drift.model_copy(update=drift)})


def _feed(monitor, events, seed=0):
    rng = np.random.default_rng(seed)
    for event in events:
        monitor.observe(event, float(rng.uniform(0.05, 0.3)) if isinstance(event, Click) else None)


def test_peaks_ignore_warm_up_and_cool_down_and_track_the_largest_statistic():
    rng = np.random.default_rng(3)
    detector = ErrorPageHinkley("m1", threshold=1e12, delta=0.05, warmup=500)
    for x in rng.exponential(0.4, 6000):
        detector.update(x, timestamp=0.0)
    quiet = detector.peak
    assert 0 < quiet < 1e12
    for x in rng.exponential(0.8, 2000):  # a rise: the statistic climbs far above its drift-free peak
        detector.update(x, timestamp=0.0)
    assert detector.peak > 5 * quiet
    labels = rng.random(5000) < 0.1
    peaks_by_warmup = []
    for warmup in (0, 10**6):
        rates = RateShift("m1", "label.ctr", z_threshold=1e12, reference=100, window=50, check_every=10, warmup=warmup)
        for y in labels:
            rates.update(bool(y), timestamp=0.0)
        peaks_by_warmup.append(rates.peak)
    assert peaks_by_warmup[0] > 0 and peaks_by_warmup[1] == 0.0


def test_calibrated_thresholds_silence_the_calibration_stream_and_keep_their_detectors():
    events = list(synthetic_events(("m1", "m2"), n=30_000, seed=5, seconds_per_event=90.0))  # 31 days
    calibrating = DriftMonitor(_settings(**NEVER_FIRE))
    _feed(calibrating, events)
    assert calibrating.events == []
    found = peaks(calibrating.detectors.values())
    assert found["error.page_hinkley"] > 0 and found["label.ctr"] > 0 and found["traffic.rate"] > 0
    updates = thresholds(found, DriftSettings())
    assert updates["ph_threshold"] == pytest.approx(FACTOR * found["error.page_hinkley"], rel=1e-2)
    assert updates["label_z"] == pytest.approx(FACTOR * max(found["label.ctr"], found["label.conversion"]), rel=1e-2)
    assert updates["psi_thresholds"]["price"] == pytest.approx(FACTOR * found["feature.price.psi"], rel=1e-2)
    for name in found:  # every default detector has exactly one calibrated setting
        field, key = setting_for(name)
        assert field in DriftSettings.model_fields
    replay = DriftMonitor(_settings(**updates))
    _feed(replay, events)
    assert replay.events == []  # same statistics, all below 1.4x their peak
    assert never_fire(DriftSettings()).ph_threshold == NEVER_FIRE["ph_threshold"]
    with pytest.raises(KeyError, match="no calibrated threshold"):
        setting_for("error.something")


def _days(rates, seed=0, cycle=True):
    """Event times: ``rates[d]`` events on day d, with an evening peak when ``cycle``."""
    rng = np.random.default_rng(seed)
    times = []
    for day, rate in enumerate(rates):
        n = rng.poisson(rate)
        hours = rng.normal(20, 3, n) % 24 if cycle else rng.random(n) * 24
        times += sorted(day * 86_400.0 + hours * 3600.0)
    return times


def test_traffic_rate_fires_on_a_collapse_and_stays_quiet_on_a_daily_cycle():
    detector = ArrivalRate("m1", threshold=5.0)
    fired = [e for t in _days([300] * 20 + [100] * 10) if (e := detector.update(None, timestamp=t))]
    assert len(fired) == 1 and 20 <= fired[0].window_end_time / 86_400 < 23
    assert fired[0].details["rate_after"] < 0.8 * fired[0].details["rate_before"]
    quiet = ArrivalRate("m1", threshold=5.0)
    assert [e for t in _days([300] * 40, seed=1) if quiet.update(None, timestamp=t)] == []
    assert 0 < quiet.peak < 5.0


def test_traffic_rate_counts_empty_days_and_skips_thin_traffic():
    detector = ArrivalRate("m1", threshold=5.0, window=2, reference=4)
    times = _days([200] * 8) + [t + 12 * 86_400 for t in _days([200] * 3, seed=2)]  # days 8-11 without events
    fired = [e for t in times if (e := detector.update(None, timestamp=t))]
    assert fired and fired[0].details["rate_after"] <= 0.5 * fired[0].details["rate_before"]
    assert fired[0].window_end_time >= 12 * 86_400  # said at the first event after the gap
    thin = ArrivalRate("m1", threshold=0.1, min_count=20)  # would fire on any change
    assert [e for t in _days([5, 1, 9, 0, 12] * 6, cycle=False) if thin.update(None, timestamp=t)] == []
    with pytest.raises(ValueError, match="window and reference"):
        ArrivalRate("m1", window=0)


def test_device_shares_are_watched_once_per_session_and_a_device_shift_is_found():
    monitor = DriftMonitor(_settings(cooldown_events=10**6))
    rng = np.random.default_rng(4)
    t = 1_700_000_000.0
    for k in range(24_000):
        shifted = k >= 16_000
        device = "app" if rng.random() < (0.7 if shifted else 0.15) else ("desktop", "mobile")[k % 2]
        t += 30.0
        for slot in range(3):  # a session: three impressions on one device
            monitor.observe(Click(event_id=f"e{k}-{slot}", merchant_id="m1", user_id=f"u{k % 500}",
                                  item_id=f"i{slot}", session_id=f"s{k}", timestamp=t + slot, position=slot,
                                  page="home", device=device, clicked=False))
    state = monitor.state("m1")
    assert state["feature.device.chi2"]["n_seen"] == 24_000  # one value per session, not per impression
    found = [e for e in monitor.events if e.detector.startswith("feature.device")]
    assert found and all(e.event_index >= 3 * 16_000 for e in found)
    assert "feature.device.psi" in build_detectors(DriftSettings(), "m1")
