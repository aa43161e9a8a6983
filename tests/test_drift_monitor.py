"""DriftMonitor end to end: seeded streams in, drift events out to the real broker topic, MLflow and the log."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import msgspec
import numpy as np
import pytest

from drift.events import DriftEvent
from drift.monitor import (
    DriftMonitor,
    JsonlSink,
    KafkaSink,
    MlflowSink,
    UnknownMerchant,
    drift_log_path,
    latest_drift,
    prediction_monitor,
    serving_run_id,
)
from drift.prequential import EmptyStream, run_monitor
from drift.synthetic import synthetic_events
from fedstream.settings import load_settings
from tests.test_drift_native import _held, _predictions, _settings


def drift_event(merchant: str, index: int, detector: str = "label.ctr") -> DriftEvent:
    return DriftEvent(merchant_id=merchant, detector=detector, statistic="z", value=6.5 + index, threshold=5.0,
                      window_start_index=index, window_end_index=index + 10, window_start_time=1.7e9 + index,
                      window_end_time=1.7e9 + index + 10, event_index=index + 10, model_version="1")


def test_price_shift_fires_feature_detectors_of_that_merchant_only(settings):
    monitor = DriftMonitor(settings, sinks=[JsonlSink(drift_log_path(settings))])
    stream = synthetic_events(n=16_000, seed=3, shift_merchant="m1", shift_at=8000, kind="prices")
    traces = run_monitor(stream, monitor, bits=settings.feature_bits)
    fired = {e.detector for e in monitor.events}
    assert {"feature.price.ks", "feature.price.psi"} <= fired
    assert {e.merchant_id for e in monitor.events} == {"m1"}
    first = min(e.global_index for e in monitor.events)
    assert 8000 <= first < 8000 + 5000
    assert monitor.global_index == 16_000 == sum(t.events for t in traces.values())
    assert [d["detector"] for d in latest_drift(settings, "m1", source="file")] == [e.detector for e in monitor.events]
    assert latest_drift(settings, "m2", source="file") == []


@pytest.mark.slow
def test_preference_shift_raises_the_prequential_error_and_is_detected(settings):
    """A more sensitive Page-Hinkley than the default (tuned for <= 1 false alarm per 1M events) via settings."""
    sensitive = settings.drift.model_copy(update={"ph_threshold": 80.0, "ph_delta": 0.01})
    monitor = DriftMonitor(settings.model_copy(update={"drift": sensitive}))
    stream = synthetic_events(n=30_000, seed=3, shift_merchant="m1", shift_at=15_000, kind="preferences")
    run_monitor(stream, monitor, bits=settings.feature_bits, trace=False)
    errors = [e for e in monitor.events if e.family == "error"]
    assert errors and all(e.merchant_id == "m1" for e in errors)
    assert 15_000 <= min(e.global_index for e in errors) < 15_000 + 5000
    assert errors[0].value >= errors[0].threshold


@pytest.mark.parametrize("drifted", [True, False])
def test_generator_taste_change_is_found_by_user_category_and_only_there(settings, drifted):
    """The platform generator's preference drift leaves shares and click rates alone; users' choices move."""
    from streams.generator import DriftSpec, GeneratorConfig, generate

    drifts = (DriftSpec("m01", 40_000, "preferences"),) if drifted else ()
    monitor = DriftMonitor(settings)
    before = {}
    for event in generate(GeneratorConfig(merchants=4, events=70_000, seed=11, drifts=drifts)):
        if monitor.global_index == 40_000 and not before:
            before = dict(monitor.merchant_index)
        monitor.observe(event)  # raw events only: features and labels, no model
    if not drifted:
        assert monitor.events == []
        assert monitor.state("m00")["feature.user_category.cusum"]["armed"]
        return
    assert [(e.merchant_id, e.detector) for e in monitor.events] == [("m01", "feature.user_category.cusum")]
    event = monitor.events[0]
    assert 0 <= event.event_index - before["m01"] < 5000 and event.global_index >= 40_000
    assert event.details["mean_since_change"] < event.details["reference_mean"]


def test_a_restored_monitor_continues_exactly_where_the_snapshot_was_taken(settings):
    """Checkpointing: half a stream, snapshot, restore in a "new process", second half == one uninterrupted run."""
    from streams.generator import DriftSpec, GeneratorConfig, generate

    events = list(generate(GeneratorConfig(merchants=3, events=50_000, seed=11,
                                           drifts=(DriftSpec("m01", 30_000, "preferences"),))))
    whole = DriftMonitor(settings)
    for event in events:
        whole.observe(event)
    first = DriftMonitor(settings)
    half = len(events) // 2
    for event in events[:half]:
        first.observe(event)
    resumed = DriftMonitor.restore(settings, first.snapshot(), model_version="7")
    for event in events[half:]:
        resumed.observe(event)
    key = [(e.merchant_id, e.detector, e.event_index, e.global_index, e.value) for e in resumed.events]
    assert key == [(e.merchant_id, e.detector, e.event_index, e.global_index, e.value) for e in whole.events
                   if e.global_index >= first.global_index]
    assert key and {e.model_version for e in resumed.events} == {"7"}
    assert resumed.state("m01")["feature.user_category.cusum"] == whole.state("m01")["feature.user_category.cusum"]
    with pytest.raises(ValueError, match="not a drift monitor snapshot"):
        DriftMonitor.restore(settings, __import__("pickle").dumps({"version": 0}))


def _only(block: tuple, keep) -> tuple:
    """The predictions of a block (merchant ids, stamps, y, p) whose merchant ``keep`` says yes to, in order."""
    m, stamps, y, p = block
    at = [i for i, merchant in enumerate(m) if keep(merchant)]
    return [m[i] for i in at], [stamps[i] for i in at], y[at], p[at]


def _without_clock(events: list) -> list:
    return [msgspec.structs.replace(e, detected_at=0.0) for e in events]


@pytest.mark.parametrize("metric", ["excess_logloss", "zero_one"])
def test_adopted_merchants_continue_as_in_one_monitor_and_the_others_are_untouched(metric):
    """A partition slot moving between learners: the new owner takes the slot's merchants from the old
    owner's snapshot (replacing its own older copy of them, dropping one the snapshot lacks) and from then
    on its detectors, counters and detections are those of one monitor that saw every prediction."""
    settings = _settings(warmup_events=200, ph_threshold=20.0, ph_min_instances=100, cooldown_events=800,
                         error_metric=metric, disabled=("label.ctr",))  # error.adwin on too
    owned = {"m2", "m3", "m9"}.__contains__  # the slot; m9: only the new owner ever saw it
    whole, peer, mine = DriftMonitor(settings), DriftMonitor(settings), DriftMonitor(settings)
    mine.observe_predictions(["m9"] * 300, [1.6e9 + k for k in range(300)], np.ones(300, bool), np.full(300, 0.01))
    adopted_at = 0
    for k, block in enumerate(_predictions(5, 240)):
        if k == 160:  # the slot moves: mine had its merchants' first 60 blocks (an older copy), peer all 160
            mine.adopt_merchants(peer.snapshot(), owned)
            adopted_at, moved_from = len(mine.events), len(whole.events)
        whole.observe_predictions(*block)
        peer.observe_predictions(*block)
        mine.observe_predictions(*(block if k >= 160 else _only(block, lambda m: k < 60 or not owned(m))))
    assert set(mine.detectors) == set(whole.detectors) == {"m0", "m1", "m2", "m3", "m4"}
    assert mine._predictions == whole._predictions and mine._watched_by.keys() <= whole.detectors.keys()
    for merchant, detectors in whole.detectors.items():
        for name, detector in detectors.items():
            assert _held(mine.detectors[merchant][name]) == _held(detector), (merchant, name)
    assert _without_clock(mine.events[adopted_at:]) == _without_clock(whole.events[moved_from:])
    moved = [e for e in whole.events[moved_from:] if owned(e.merchant_id)]
    assert moved and any(owned(e.merchant_id) for e in whole.events[:moved_from])  # detections before and after

    mine.adopt_merchants(None, owned)  # a peer without this monitor: the slot's merchants start again
    assert set(mine.detectors) == set(mine._predictions) == {"m0", "m1", "m4"}


def test_a_snapshot_of_the_former_code_is_adopted_merchant_by_merchant():
    """tests/data/drift_monitor_before_fastpath.pkl (merchants a, b, c; open chunks, detections made,
    cool-downs running): a peer checkpoint of an older worker gives exactly its merchants' detectors."""
    blob = (Path(__file__).parent / "data" / "drift_monitor_before_fastpath.pkl").read_bytes()
    settings = load_settings(data_dir=tempfile.mkdtemp())
    whole = DriftMonitor.restore(settings, blob, model_version="8")
    mine, own = DriftMonitor(settings, model_version="8"), DriftMonitor(settings, model_version="8")
    blocks = [(["z" if x == "m3" else "abz"[int(x[1:]) % 3] for x in m], stamps, y, p)
              for m, stamps, y, p in _predictions(13, 120, merchants=4)]
    for block in blocks[:40]:
        mine.observe_predictions(*_only(block, "z".__eq__))
        own.observe_predictions(*_only(block, "z".__eq__))
    mine.adopt_merchants(blob, {"a", "b"}.__contains__)
    adopted_at = len(mine.events)
    for block in blocks[40:]:
        mine.observe_predictions(*block)
        whole.observe_predictions(*_only(block, {"a", "b"}.__contains__))
        own.observe_predictions(*_only(block, "z".__eq__))
    assert set(mine.detectors) == {"a", "b", "z"}
    for merchant, reference in (("a", whole), ("b", whole), ("z", own)):
        assert mine._predictions[merchant] == reference._predictions[merchant]
        for name, detector in reference.detectors[merchant].items():
            assert _held(mine.detectors[merchant][name]) == _held(detector), (merchant, name)
    moved = [e for e in mine.events[adopted_at:] if e.merchant_id != "z"]
    assert moved and {e.model_version for e in moved} == {"8"}
    assert _without_clock(moved) == _without_clock(whole.events)


def test_the_learners_monitor_builds_restores_and_adopts_only_the_detectors_it_feeds():
    """``prediction_monitor`` (the learner worker's) holds only the error detectors: it detects exactly as a
    monitor holding every detector, a snapshot of one of those (the former learner's, or the fixture written by
    the code before the native path) restores and is adopted without the unfed ones, and its own is smaller."""
    settings = _settings(warmup_events=200, ph_threshold=20.0, ph_min_instances=100, cooldown_events=800,
                         disabled=("label.ctr",))  # error.adwin on too
    errors = {"error.adwin", "error.page_hinkley"}
    full, lean = DriftMonitor(settings), prediction_monitor(settings, None)
    blocks = list(_predictions(7, 240))
    for k, block in enumerate(blocks):
        if k == 120:  # restarts: the lean one from the full one's snapshot, as a learner upgraded mid-stream
            snapshot = full.snapshot()
            full, resumed = DriftMonitor.restore(settings, snapshot), prediction_monitor(settings, snapshot)
            assert len(lean.snapshot()) < len(snapshot)
            lean = resumed
        full.observe_predictions(*block)
        lean.observe_predictions(*block)
    assert {m: set(d) for m, d in lean.detectors.items()} == {m: errors for m in full.detectors}
    assert len(full.detectors["m0"]) > len(errors)
    for merchant, detectors in lean.detectors.items():
        for name, detector in detectors.items():
            assert _held(detector) == _held(full.detectors[merchant][name]), (merchant, name)
    assert _without_clock(lean.events) == _without_clock(full.events) and lean._predictions == full._predictions
    assert {e.detector for e in lean.events} >= {"error.page_hinkley"}

    owned = {"m1", "m2"}.__contains__
    lean.adopt_merchants(full.snapshot(), owned)
    assert {m: set(d) for m, d in lean.detectors.items()} == {m: errors for m in full.detectors}
    blob = (Path(__file__).parent / "data" / "drift_monitor_before_fastpath.pkl").read_bytes()
    old, resumed = DriftMonitor.restore(load_settings(data_dir=tempfile.mkdtemp()), blob), prediction_monitor(
        load_settings(data_dir=tempfile.mkdtemp()), blob)
    assert {m: set(d) for m, d in resumed.detectors.items()} == {m: errors for m in "abc"}
    for merchant, detectors in resumed.detectors.items():
        for name, detector in detectors.items():
            assert _held(detector) == _held(old.detectors[merchant][name]), (merchant, name)


def test_adopted_merchants_take_their_context_and_sessions_along(settings):
    """A monitor fed raw events (owning its feature context, as ``fedstream drift follow``): the moved
    merchants' context, open sessions and event counters come along, so their detectors go on as in one monitor."""
    from streams.generator import DriftSpec, GeneratorConfig, generate

    events = list(generate(GeneratorConfig(merchants=4, events=30_000, seed=12,
                                           drifts=(DriftSpec("m01", 16_000, "prices"),))))
    owned, half = {"m01", "m02"}.__contains__, 15_000
    whole, peer, mine = DriftMonitor(settings), DriftMonitor(settings), DriftMonitor(settings)
    for event in events[:half]:
        whole.observe(event)
        peer.observe(event)
        if not owned(event.merchant_id):
            mine.observe(event)
    mine.adopt_merchants(peer.snapshot(), owned)
    adopted_at, moved_from = len(mine.events), len(whole.events)
    for event in events[half:]:
        whole.observe(event)
        mine.observe(event)
    assert mine.merchant_index == whole.merchant_index and mine._sessions == whole._sessions
    assert mine.context.state() == whole.context.state()
    for merchant in ("m01", "m02"):
        assert mine.state(merchant) == whole.state(merchant)
    moved = [msgspec.structs.replace(e, detected_at=0.0, global_index=-1) for e in mine.events[adopted_at:]]
    assert moved == [msgspec.structs.replace(e, detected_at=0.0, global_index=-1) for e in whole.events[moved_from:]]
    assert any(e.merchant_id == "m01" for e in moved)


def test_stationary_stream_raises_no_drift(settings):
    monitor = DriftMonitor(settings)
    run_monitor(synthetic_events(n=20_000, seed=4), monitor, bits=settings.feature_bits, trace=False)
    assert monitor.events == []
    state = monitor.state("m1")
    assert state["error.page_hinkley"]["n_seen"] > 10_000 and state["feature.price.ks"]["n_detections"] == 0


def test_unknown_merchants_and_empty_streams_are_clear_errors(settings):
    monitor = DriftMonitor(settings, merchants=["m1"])
    with pytest.raises(UnknownMerchant, match="'m9' is not monitored"):
        monitor.observe_prediction("m9", 1.7e9, y=True, p=0.4)
    with pytest.raises(UnknownMerchant, match="no detectors yet"):
        monitor.state("m1")
    with pytest.raises(EmptyStream):
        run_monitor([], DriftMonitor(settings))
    with pytest.raises(ValueError, match="limit"):
        latest_drift(settings, limit=0, source="file")
    with pytest.raises(ValueError, match="unknown drift source"):
        latest_drift(settings, source="carrier-pigeon")


def test_observe_prediction_feeds_only_error_detectors(settings):
    assert "error.adwin" not in DriftMonitor(settings)._detectors_of("m1")  # off by default
    monitor = DriftMonitor(settings.model_copy(update={"drift": settings.drift.model_copy(update={"disabled": ()})}))
    for k in range(2000):
        monitor.observe_prediction("m1", 1.7e9 + k, y=k % 7 == 0, p=0.15)
    state = monitor.state("m1")
    assert state["error.adwin"]["n_seen"] == state["error.page_hinkley"]["n_seen"] == 2000
    assert state["label.ctr"]["n_seen"] == 0 and state["feature.price.ks"]["n_seen"] == 0


def test_a_block_of_predictions_detects_like_one_at_a_time(settings):
    import numpy as np

    rng = np.random.default_rng(5)
    n = 12_000
    merchants = ["m1" if k % 3 else "m2" for k in range(n)]
    stamps = [1.7e9 + k for k in range(n)]
    p = np.full(n, 0.15)
    y = rng.random(n) < np.where(np.arange(n) < 6000, 0.15, 0.45)  # the model goes stale halfway
    one, block = DriftMonitor(settings), DriftMonitor(settings)
    for row in zip(merchants, stamps, y.tolist(), p.tolist()):
        one.observe_prediction(*row)
    for start in range(0, n, 256):
        block.observe_predictions(merchants[start:start + 256], stamps[start:start + 256], y[start:start + 256],
                                  p[start:start + 256])
    found = [(e.merchant_id, e.detector, e.event_index) for e in one.events]
    assert found and {m for m, _, _ in found} == {"m1", "m2"}
    assert [(e.merchant_id, e.detector, e.event_index) for e in block.events] == found
    for merchant in ("m1", "m2"):
        assert block.state(merchant) == one.state(merchant)
        assert block._predictions[merchant] == one._predictions[merchant]
    with pytest.raises(ValueError, match="one length"):
        block.observe_predictions(["m1"], [1.7e9, 1.8e9], np.array([True]), np.array([0.5]))


def test_drift_events_are_published_to_the_broker_and_read_back(kafka_settings):
    sink = KafkaSink(kafka_settings)
    try:
        for k, merchant in enumerate(["m1", "m2", "m1", "m3", "m1"]):
            sink.publish(drift_event(merchant, k * 100))
    finally:
        sink.close()
    everything = latest_drift(kafka_settings, source="kafka")
    assert [d["merchant_id"] for d in everything] == ["m1", "m2", "m1", "m3", "m1"]
    newest_m1 = latest_drift(kafka_settings, "m1", limit=2)  # default source: the broker is configured
    assert [d["event_index"] for d in newest_m1] == [210, 410]
    assert newest_m1[-1]["model_version"] == "1" and newest_m1[-1]["detector"] == "label.ctr"
    assert latest_drift(kafka_settings, "nobody", source="kafka") == []


def test_unreadable_log_lines_are_skipped(settings):
    path = drift_log_path(settings)
    JsonlSink(path).publish(drift_event("m1", 1))
    with path.open("ab") as handle:
        handle.write(b'{"torn": \n')
    JsonlSink(path).publish(drift_event("m1", 2))
    assert [d["event_index"] for d in latest_drift(settings, source="file")] == [11, 12]


def test_drift_is_logged_on_the_champion_models_run(settings):
    from registry.tracking import client, experiment_id

    mlflow_client = client(settings)
    run = mlflow_client.create_run(experiment_id(settings), run_name="online-learner")
    name = settings.serving.model_name
    mlflow_client.create_registered_model(name)
    version = mlflow_client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    mlflow_client.set_registered_model_alias(name, "champion", version.version)

    run_id = serving_run_id(settings)
    assert run_id == run.info.run_id
    sink = MlflowSink(settings, run_id)
    sink.publish(drift_event("m1", 5, "error.page_hinkley"))
    sink.publish(drift_event("m1", 50, "error.page_hinkley"))
    sink.publish(drift_event("m/2", 7))
    logged = mlflow_client.get_run(run_id).data
    history = mlflow_client.get_metric_history(run_id, "drift/m1/error.page_hinkley")
    assert [(m.step, m.value) for m in history] == [(15, 11.5), (60, 56.5)]
    assert "drift/m_2/label.ctr" in logged.metrics
    assert logged.tags["drift.m1.count"] == "2"
    assert json.loads(logged.tags["drift.m1.last"])["event_index"] == 60
    assert json.loads(logged.tags["drift.last"]) == {"merchant_id": "m/2", "detector": "label.ctr"}


def test_without_a_champion_drift_goes_to_one_reused_monitor_run(settings):
    from registry.tracking import client

    first = serving_run_id(settings)
    assert serving_run_id(settings) == first
    assert client(settings).get_run(first).info.run_name == "drift-monitor"
    assert serving_run_id(settings, run_id="given") == "given"
