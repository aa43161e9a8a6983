"""The drift benchmark's bookkeeping: disjoint seed sets, drift placement, delays and false alarms."""

from __future__ import annotations

from drift.events import DriftEvent
from streams.generator import DRIFT_KINDS, GeneratorConfig

from benchmarks import drift as bench


def test_calibration_and_report_seeds_are_disjoint_and_numerous():
    calibration, held_out = set(bench.CALIBRATION_SEEDS), set(bench.REPORT_SEEDS) | set(bench.POWER_SEEDS)
    assert not calibration & held_out
    assert len(bench.REPORT_SEEDS) >= 5 and {0.1, 0.3, 0.5, 1.0} <= set(bench.MAGNITUDES)


def test_power_plan_puts_each_kind_once_on_the_largest_merchants_and_rotates():
    first, second = bench.power_plan(301, 0, 0.5, 100_000), bench.power_plan(301, 1, 0.5, 100_000)
    for plan in (first, second):
        assert sorted(d.kind for d in plan.drifts) == sorted(DRIFT_KINDS)
        assert sorted(d.merchant_id for d in plan.drifts) == ["m00", "m01", "m02", "m03", "m04"]
        assert all(d.magnitude == 0.5 and 50_000 <= d.at_event < 100_000 for d in plan.drifts)
    assert {d.kind: d.merchant_id for d in first.drifts} != {d.kind: d.merchant_id for d in second.drifts}


def _event(merchant, index, global_index, detector="feature.price.index"):
    return DriftEvent(merchant_id=merchant, detector=detector, statistic="s", value=1.0, threshold=0.5,
                      window_start_index=index, window_end_index=index, window_start_time=0.0, window_end_time=0.0,
                      event_index=index, global_index=global_index)


class _Monitor:
    def __init__(self, events, merchant_index, global_index):
        self.events, self.merchant_index, self.global_index = events, merchant_index, global_index


def test_delays_count_the_merchants_own_events_and_early_or_foreign_detections_are_false_alarms():
    truth = [{"merchant_id": "m01", "at_event": 1000, "kind": "prices", "magnitude": 1.0}]
    events = [_event("m01", 50, 900), _event("m01", 400, 5000), _event("m01", 9000, 90_000, "label.ctr"),
              _event("m02", 10, 2000)]
    run = bench.Run(GeneratorConfig(events=100_000, seed=1), truth, _Monitor(events, {"m01": 9500}, 100_000),
                    merchant_at={0: 100})
    (row,) = bench.drift_rows(run)
    assert row["delays"] == {"feature.price.index": 300, "label.ctr": 8900}
    assert row["found"] and row["merchant_events_after"] == 9400
    assert [(e.merchant_id, e.event_index) for e in bench.false_alarms(run)] == [("m01", 50), ("m02", 10)]
    late = bench.Run(run.config, truth, _Monitor(events[2:], {"m01": 9500}, 100_000), merchant_at={0: 100})
    assert not bench.drift_rows(late)[0]["found"]  # only a detection 8.9k merchant events later
