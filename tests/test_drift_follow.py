"""`fedstream drift monitor --follow`: the event detectors as a restartable consumer-group member."""

from __future__ import annotations

from click.testing import CliRunner

from drift.follow import DriftFollower
from drift.monitor import DriftMonitor
from drift.synthetic import synthetic_events
from fedstream.settings import load_settings
from streams.producer import EventProducer
from tests.test_online_worker import single_partition_settings


def test_follower_stops_resumes_and_ends_like_one_uninterrupted_monitor(broker, tmp_path):
    settings = single_partition_settings(load_settings(data_dir=tmp_path / "data", feature_bits=16), broker)
    stream = list(synthetic_events(n=12_000, seed=3, shift_merchant="m1", shift_at=6000, kind="prices"))
    with EventProducer(settings, source="test-drift-follow") as producer:
        summary = producer.send_many(stream)
    assert summary["dead_lettered"] == 0

    checkpoint = tmp_path / "follow.ckpt"
    first = DriftFollower(settings, group="follow", checkpoint_path=checkpoint, max_events=5000,
                          idle_timeout_s=5).run()
    assert first["stopped"] == "max_events" and 5000 <= first["observed_this_run"] < len(stream)
    second = DriftFollower(settings, group="follow", checkpoint_path=checkpoint, idle_timeout_s=3).run()
    assert second["stopped"] == "idle"
    assert first["observed_this_run"] + second["observed_this_run"] == len(stream)  # none missed, none twice

    reference = DriftMonitor(settings)
    for event in stream:
        reference.observe(event)
    resumed = DriftFollower(settings, group="follow", checkpoint_path=checkpoint).monitor
    assert resumed.global_index == reference.global_index == 12_000
    for merchant in ("m1", "m2"):
        assert resumed.state(merchant) == reference.state(merchant)
    found = [(e.merchant_id, e.detector, e.event_index) for e in reference.events]
    assert {"feature.price.psi"} <= {d for m, d, _ in found if m == "m1"}
    assert [(e.merchant_id, e.detector, e.event_index) for e in resumed.events] == []  # events are not state
    assert second["drift_events"] + first["drift_events"] == len(found)


def test_follow_cli_refuses_an_events_file_and_a_foreign_checkpoint(settings, tmp_path):
    from fedstream.cli import main

    runner = CliRunner()
    both = runner.invoke(main, ["drift", "monitor", "--follow", "--events", str(tmp_path / "x.jsonl")])
    assert both.exit_code == 2 and "--follow reads the Kafka topics" in both.output
    foreign = tmp_path / "foreign.ckpt"
    foreign.write_bytes(__import__("pickle").dumps({"version": 99}))
    result = runner.invoke(main, ["drift", "monitor", "--follow", "--checkpoint", str(foreign), "--no-kafka",
                                  "--no-mlflow"], env={"FEDSTREAM_DATA_DIR": str(settings.data_path)})
    assert result.exit_code == 1 and "not a drift follower checkpoint" in result.output
