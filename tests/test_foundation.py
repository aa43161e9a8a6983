"""Foundation: settings precedence, CLI help, embedded broker, consumer-group offsets, MLflow store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedstream.cli import SUBCOMMANDS, main
from fedstream.settings import load_settings
from streams.kafka import BrokerUnavailable, make_consumer, make_producer

REPO = Path(__file__).resolve().parents[1]


def test_settings_precedence_defaults_file_env(tmp_path, monkeypatch):
    assert load_settings().topics.clicks.partitions == 8
    config = tmp_path / "fedstream.toml"
    config.write_text('feature_bits = 18\nbootstrap_servers = "file:9092"\n[topics.clicks]\nname = "c"\npartitions = 3\n')
    from_file = load_settings(config_file=config)
    assert (from_file.feature_bits, from_file.bootstrap_servers, from_file.topics.clicks.partitions) == (18, "file:9092", 3)
    monkeypatch.setenv("FEDSTREAM_BOOTSTRAP_SERVERS", "env:9092")
    monkeypatch.setenv("FEDSTREAM_TOPICS__CLICKS__PARTITIONS", "5")
    from_env = load_settings(config_file=config)
    assert from_env.bootstrap_servers == "env:9092"
    assert from_env.topics.clicks.partitions == 5
    assert from_env.feature_bits == 18  # file still applies where env is silent


def test_settings_reject_wrong_types(monkeypatch):
    monkeypatch.setenv("FEDSTREAM_FEATURE_BITS", "many")
    with pytest.raises(ValueError, match="feature_bits"):
        load_settings()


def test_cli_help_lists_every_subcommand_and_each_has_help():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0, top.output
    for name in SUBCOMMANDS:
        assert name in top.output
        sub = runner.invoke(main, [name, "--help"])
        assert sub.exit_code == 0, (name, sub.output)
        assert "Usage:" in sub.output


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "fedstream"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "broker" in out.stdout


def test_broker_cli_start_status_stop(tmp_path):
    env = {"FEDSTREAM_DATA_DIR": str(tmp_path)}
    runner = CliRunner()
    started = runner.invoke(main, ["broker", "start"], env=env)
    assert started.exit_code == 0, started.output
    record = json.loads(started.output.strip().splitlines()[-1])
    try:
        status = runner.invoke(main, ["broker", "status"], env=env)
        assert status.exit_code == 0 and json.loads(status.output)["alive"] is True
        assert json.loads(status.output)["cluster_id"] == record["cluster_id"]
        again = runner.invoke(main, ["broker", "start"], env=env)
        assert again.exit_code == 1 and "already runs" in again.output  # one line, no traceback
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=record["bootstrap"])
        topics = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(_platform_topics()))}
        admin.close()
        assert topics == _platform_topics()
    finally:
        stopped = runner.invoke(main, ["broker", "stop"], env=env)
    assert json.loads(stopped.output)["stopped"] is True
    assert not Path(f"/proc/{record['pid']}").exists() or b"tansu" not in Path(f"/proc/{record['pid']}/cmdline").read_bytes()
    assert runner.invoke(main, ["broker", "status"], env=env).exit_code == 1


def _platform_topics() -> dict[str, int]:
    return {t.name: t.partitions for t in load_settings().topics.all()}


def test_taken_port_is_reported_not_silently_accepted(tmp_path, broker):
    from streams.broker import BrokerStartError, start_broker_process

    taken = int(broker.rsplit(":", 1)[1])
    with pytest.raises(BrokerStartError):
        start_broker_process(tmp_path, port=taken, timeout_s=5)


def test_consumer_group_resumes_from_committed_offsets(kafka_settings):
    topic = kafka_settings.topics.clicks.name
    producer = make_producer(kafka_settings)
    for i in range(100):
        producer.send(topic, key=f"m{i % 7}".encode(), value=f"event-{i}".encode())
    producer.flush()
    producer.close()
    group = f"g-{uuid.uuid4().hex[:6]}"

    first = make_consumer(kafka_settings, group, topic)
    seen = _drain(first, limit=40)
    first.commit()
    first.close()
    second = make_consumer(kafka_settings, group, topic)
    rest = _drain(second, limit=None)
    second.close()

    assert len(seen) == 40
    assert sorted(seen + rest, key=lambda v: int(v.split("-")[1])) == [f"event-{i}" for i in range(100)]
    assert not set(seen) & set(rest)


def _drain(consumer, limit: int | None, idle_polls: int = 8) -> list[str]:
    """Read up to ``limit`` values, pausing partitions so nothing past the limit is consumed."""
    values: list[str] = []
    idle = 0
    while idle < idle_polls and (limit is None or len(values) < limit):
        batch = consumer.poll(timeout_ms=500, max_records=1 if limit else 500)
        idle = idle + 1 if not batch else 0
        for records in batch.values():
            values.extend(r.value.decode() for r in records)
    return values


def test_dead_broker_gives_a_clear_error(settings):
    dead = settings.model_copy(update={"bootstrap_servers": "127.0.0.1:1"})
    with pytest.raises(BrokerUnavailable, match="127.0.0.1:1"):
        make_producer(dead, bootstrap_timeout_ms=2000)


def test_mlflow_logs_a_run_and_reads_it_back(settings):
    from registry.tracking import client, experiment_id, tracking_uri

    assert tracking_uri(settings).startswith("sqlite:////")
    mlflow_client = client(settings)
    run = mlflow_client.create_run(experiment_id(settings))
    mlflow_client.log_metric(run.info.run_id, "logloss", 0.42, step=3)
    mlflow_client.log_param(run.info.run_id, "model", "ftrl")
    mlflow_client.set_terminated(run.info.run_id)
    again = client(settings).get_run(run.info.run_id)
    assert again.data.metrics["logloss"] == pytest.approx(0.42)
    assert again.data.params["model"] == "ftrl"
    assert again.info.status == "FINISHED"


def test_deploy_compose_file_validates():
    """In CI (``CI=true``, where ``make test`` installs Debian's docker-compose) a missing tool is a failure,
    not a skip: a skipped validation once let ``make test`` pass without checking ``deploy/``."""
    if shutil.which("docker-compose") is None:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("docker-compose is not installed, so deploy/docker-compose.yml cannot be validated "
                        "(make compose-tools installs it)")
        pytest.skip("Debian docker-compose not installed (outside CI)")
    out = subprocess.run(["docker-compose", "-f", str(REPO / "deploy" / "docker-compose.yml"), "config", "-q"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_concurrent_workers_open_a_fresh_mlflow_store_safely(tmp_path):
    """Learner workers start together on a new sqlite store; MLflow's migrations must not race."""
    code = ("import sys; from fedstream.settings import load_settings; from registry.tracking import experiment_id;"
            "print(experiment_id(load_settings(data_dir=sys.argv[1])))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], [err[-500:] for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1


def test_activate_leaves_no_store_behind(tmp_path, monkeypatch):
    import mlflow

    from registry.tracking import activate, tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = load_settings(data_dir=tmp_path / "a"), load_settings(data_dir=tmp_path / "b")
    with activate(first):
        assert mlflow.get_tracking_uri() == tracking_uri(first)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    with activate(second):
        assert mlflow.get_tracking_uri() == tracking_uri(second)
        assert mlflow.get_registry_uri() == tracking_uri(second)
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_files_docstring_examples_run():
    import doctest

    import fedstream.files

    assert doctest.testmod(fedstream.files).failed == 0
