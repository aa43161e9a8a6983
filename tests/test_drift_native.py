"""error.page_hinkley's native block path and the monitor's block path against the per-value path and the frozen
former block path (tests/evaldrift_reference.py): same detections at the same positions, same state (River's
object included), snapshots of the former code restore and continue identically."""

from __future__ import annotations

import math
import pickle
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from drift.detectors import ErrorADWIN, ErrorPageHinkley, kernels, prequential_errors
from drift.monitor import DriftMonitor
from fedstream.settings import load_settings
from tests.evaldrift_reference import old_observe_predictions, old_prequential_errors

FLOATS = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@hypothesis_settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(FLOATS, st.sampled_from([0.0, -0.0, 1e-16, 1.0, 1e16, -1e16, 5e-324, 2.0**-1074]),
                          st.floats(min_value=-1.0, max_value=1.0)), min_size=1, max_size=40))
def test_exact_sum_is_math_fsum(values):
    array = np.array(values, dtype=np.float64)
    got = kernels.exact_sum(array, len(array), np.empty(len(array)))
    assert got == math.fsum(values) and math.copysign(1, got) == math.copysign(1, math.fsum(values))


def test_exact_sum_of_non_finite_values_is_fsums():
    scratch = np.empty(4)
    for values in ([1.0, math.inf, 2.0], [-math.inf, 1.0], [math.nan, 1.0]):
        got, expected = kernels.exact_sum(np.array(values), len(values), scratch), math.fsum(values)
        assert got == expected or (math.isnan(got) and math.isnan(expected))
    with pytest.raises(ValueError, match="-inf \\+ inf"):
        kernels.exact_sum(np.array([math.inf, -math.inf]), 2, scratch)
    with pytest.raises(OverflowError):
        kernels.exact_sum(np.array([1.7e308, 1.7e308]), 2, scratch)


def _errors(seed: int, n: int = 30_000) -> np.ndarray:
    """Excess-logloss-like errors whose mean rises three times (so tests fire, re-arm and fire again), with
    runs of exact ties and zeros."""
    rng = np.random.default_rng(seed)
    level = np.repeat([0.0, 0.25, 0.05, 0.6], n // 4)
    errors = rng.exponential(0.5, n) - 0.5 + level
    errors[rng.random(n) < 0.05] = 0.0
    errors[rng.random(n) < 0.05] = 0.125
    return errors


def _river(detector: ErrorPageHinkley) -> tuple:
    ph, mean = detector.ph, detector.ph._x_mean
    return (type(mean.n), mean.n, mean._mean, ph._sum_increase, ph._sum_decrease, ph._min_increase,
            type(ph._max_decrease), ph._max_decrease, ph._drift_detected, ph.threshold, ph.alpha, ph.delta)


def _fields(detector) -> dict:
    """Everything a detector holds (River's object and the trail unpacked, events without their wall clock)."""
    out = {k: v for k, v in vars(detector).items() if k not in ("ph", "adwin", "_trail", "last_event")}
    out["last_event"] = None if detector.last_event is None else msgspec.structs.replace(detector.last_event,
                                                                                          detected_at=0.0)
    out["trail"] = (list(detector._trail.counts), list(detector._trail.points))
    out["_pending"] = [(type(v), v) for v in detector._pending]
    if isinstance(detector, ErrorPageHinkley):
        out["river"] = _river(detector)
    return out


def _held(detector) -> dict:
    """:func:`_fields` of an error detector; what another detector shows of itself (``state()``)."""
    return _fields(detector) if detector.family == "error" else detector.state()


def _strip(found):
    return [(i, msgspec.structs.replace(e, detected_at=0.0)) for i, e in found]


@pytest.mark.parametrize("options", [
    dict(threshold=15.0, delta=0.01, warmup=500, cooldown=3000, chunk=16, min_instances=200),
    dict(threshold=6.0, delta=0.0, warmup=0, cooldown=0, chunk=1, min_instances=3),
    dict(threshold=10.0, delta=0.02, warmup=37, cooldown=40, chunk=3, min_instances=30),  # fires inside cool-downs
])
def test_page_hinkley_blocks_equal_one_value_at_a_time(options):
    errors, stamps = _errors(5), 1.7e9 + np.arange(30_000) * 0.5
    single, blocked = ErrorPageHinkley("m1", **options), ErrorPageHinkley("m1", **options)
    expected = [(i, e) for i, x in enumerate(errors.tolist())
                if (e := single.update(x, timestamp=float(stamps[i]), index=i)) is not None]
    sizes = np.random.default_rng(2).integers(1, 400, len(errors))
    found, start, compared = [], 0, 0
    for size in sizes.tolist():
        stop = min(start + size, len(errors))
        found += [(start + k, e) for k, e in blocked.update_many(errors[start:stop], stamps[start:stop],
                                                                 range(start, stop))]
        start = stop
        if start == len(errors):
            break
    assert len(expected) >= 3
    assert _strip(found) == _strip(expected)
    assert _fields(blocked) == _fields(single) and blocked.state() == single.state()
    compared += 1
    # the per-value path continues from the native one's state (and the reverse) identically
    more = _errors(6, 4000)
    for x in more[:2000].tolist():
        single.update(x, timestamp=2e9, index=7)
    blocked.update_many(more[:2000], np.full(2000, 2e9), [7] * 2000)
    assert _fields(blocked) == _fields(single)
    blocked.update_many(more[2000:], np.full(2000, 2e9), range(2000))
    for k, x in enumerate(more[2000:].tolist()):
        single.update(x, timestamp=2e9, index=k)
    assert _fields(blocked) == _fields(single) and compared


def test_page_hinkley_river_fresh_state_keeps_river_types():
    """Before River's first update (warm-up, or a new test after a detection) its count is the int 0 and
    ``_max_decrease`` the int -1, as River leaves them."""
    detector = ErrorPageHinkley("m1", warmup=100, chunk=16)
    detector.update_many(np.full(115, 0.1), np.arange(115.0), range(115))
    assert detector.ph._x_mean.n == 0 and type(detector.ph._x_mean.n) is int
    assert type(detector.ph._max_decrease) is int and detector.state()["pending"] == 15
    detector.update_many(np.full(1, 0.1), np.arange(1.0), range(1))
    assert detector.ph._x_mean.n == 1.0 and type(detector.ph._x_mean.n) is float and detector.state()["pending"] == 0


def _settings(**drift):
    settings = load_settings(data_dir=tempfile.mkdtemp())
    return settings.model_copy(update={"drift": settings.drift.model_copy(update=drift)})


def _predictions(seed: int, blocks: int, merchants: int = 5):
    """Blocks as the worker gives them: 1-300 predictions of a few merchants, stamps as a list; the model
    goes stale for some merchants halfway."""
    rng = np.random.default_rng(seed)
    ids = [f"m{k}" for k in range(merchants)]
    t = 1.7e9
    for block in range(blocks):
        n = int(rng.integers(1, 300))
        mix = 1 if block % 5 == 0 else merchants
        m = [ids[k] for k in rng.integers(0, mix, n)]
        p = rng.beta(2, 8, n)
        p[rng.random(n) < 0.02] = rng.choice([0.0, 1.0, 1e-4, 0.9999])
        stale = np.array([block > blocks // 2 and int(x[1:]) % 2 == 0 for x in m])
        y = rng.random(n) < np.where(stale, np.minimum(3 * p, 1), p)
        yield m, (t + np.arange(n)).tolist(), y, p
        t += n


def _same_monitors(new: DriftMonitor, old: DriftMonitor) -> None:
    assert [msgspec.structs.replace(e, detected_at=0.0) for e in new.events] == \
        [msgspec.structs.replace(e, detected_at=0.0) for e in old.events]
    assert new._predictions == old._predictions and list(new.detectors) == list(old.detectors)
    for merchant, detectors in old.detectors.items():
        for name, detector in detectors.items():
            assert _held(new.detectors[merchant][name]) == _held(detector), (merchant, name)


@pytest.mark.parametrize("metric", ["excess_logloss", "zero_one"])
def test_monitor_blocks_equal_the_former_block_path(metric):
    settings = _settings(warmup_events=200, ph_threshold=20.0, ph_min_instances=100, cooldown_events=800,
                         error_metric=metric, disabled=("label.ctr",))  # error.adwin on: the generic path
    new, old = DriftMonitor(settings), DriftMonitor(settings)
    for block, (m, stamps, y, p) in enumerate(_predictions(3, 240)):
        got = new.observe_predictions(m, stamps, y, p)
        want = old_observe_predictions(old, m, stamps, y, p)
        assert [e.detector for e in got] == [e.detector for e in want]
        if block == 120:  # checkpoint both and continue from the snapshots
            new = DriftMonitor.restore(settings, new.snapshot())
            old = DriftMonitor.restore(settings, old.snapshot())
    assert len(new.events) >= 4 and {e.detector for e in new.events} >= {"error.page_hinkley"}
    _same_monitors(new, old)


def test_monitor_blocks_equal_one_prediction_at_a_time():
    settings = _settings(warmup_events=100, ph_threshold=15.0, ph_min_instances=50)
    blocked, single = DriftMonitor(settings), DriftMonitor(settings)
    for m, stamps, y, p in _predictions(8, 80, merchants=3):
        blocked.observe_predictions(m, stamps, y, np.full(len(p), 0.25))
        for row in zip(m, stamps, y.tolist(), [0.25] * len(p)):
            single.observe_prediction(*row)
    assert len(single.events) >= 2
    _same_monitors(blocked, single)


def test_a_snapshot_of_the_former_code_restores_and_continues_identically():
    """tests/data/drift_monitor_before_fastpath.pkl: a monitor snapshot taken by the code before the native path
    (tests/data/evaldrift_fixtures.py: open chunks, detections made, cool-downs running)."""
    blob = (Path(__file__).parent / "data" / "drift_monitor_before_fastpath.pkl").read_bytes()
    settings = load_settings(data_dir=tempfile.mkdtemp())
    new, old = DriftMonitor.restore(settings, blob), DriftMonitor.restore(settings, blob)
    assert any(d.n_detections for d in (m["error.page_hinkley"] for m in new.detectors.values()))
    for m, stamps, y, p in _predictions(11, 120, merchants=4):
        m = ["a" if x == "m3" else x.replace("m", "abc"[int(x[1:]) % 3]) for x in m]
        new.observe_predictions(m, stamps, y, p)
        old_observe_predictions(old, m, stamps, y, p)
    assert len(new.events) >= 1
    _same_monitors(new, old)
    assert pickle.loads(new.snapshot())["version"] == DriftMonitor.SNAPSHOT_VERSION


def test_adwin_keeps_the_generic_block_path_with_arrays():
    errors = _errors(7, 8000)
    single, blocked = ErrorADWIN("m1", warmup=100, chunk=8), ErrorADWIN("m1", warmup=100, chunk=8)
    for i, x in enumerate(errors.tolist()):
        single.update(x, timestamp=float(i), index=i)
    for start in range(0, 8000, 333):
        blocked.update_many(errors[start:start + 333], np.arange(start, min(start + 333, 8000), dtype=float),
                            range(start, min(start + 333, 8000)))
    assert blocked.state() == single.state() and _fields(blocked) == _fields(single)


@pytest.mark.parametrize("metric", ["excess_logloss", "logloss", "zero_one"])
def test_block_errors_are_the_former_ones_bit_for_bit(metric):
    rng = np.random.default_rng(21)
    for n in (1, 5, 8, 17, 256, 1000):
        p = rng.random(n)
        edge = rng.random(n) < 0.3
        p[edge] = rng.choice([0.0, 1.0, 1e-3, 1 - 1e-3, 5e-324, 0.5, 1e-4], int(edge.sum()))
        y = rng.random(n) < 0.4
        for clip in (1e-3, 0.25):
            got, want = prequential_errors(y, p, metric, clip), old_prequential_errors(y, p, metric, clip)
            assert got.tobytes() == want.tobytes()
