"""`fedstream drift report|monitor|status`: self-contained HTML + PNGs, MLflow artifacts, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from drift.synthetic import synthetic_events
from fedstream.cli import main
from fedstream.settings import Settings
from streams.schemas import encode_event

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_events(path: Path, **options) -> Path:
    with path.open("wb") as handle:
        for event in synthetic_events(**options):
            handle.write(encode_event(event) + b"\n")
    return path


@pytest.fixture(scope="module")
def events_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A price shift of m1 at event 7000, with the ground truth next to it as `fedstream generate --out` writes."""
    path = write_events(tmp_path_factory.mktemp("events") / "events.jsonl", n=16_000, seed=3, shift_merchant="m1",
                        shift_at=7000, kind="prices")
    repriced = [json.loads(line) for line in path.read_text().splitlines() if '"catalog"' in line]
    shift_time = max(row["timestamp"] for row in repriced)
    truth = {"drifts": [{"merchant_id": "m1", "at_event": 7000, "timestamp": shift_time, "kind": "prices"}]}
    path.with_suffix(".truth.json").write_text(json.dumps(truth))
    return path


def invoke(settings: Settings, *args: str):
    """Run the CLI with ``settings`` passed the way users do: FEDSTREAM_* environment variables."""
    env = {"FEDSTREAM_DATA_DIR": str(settings.data_dir), "FEDSTREAM_FEATURE_BITS": str(settings.feature_bits),
           "FEDSTREAM_TOPICS": settings.topics.model_dump_json()}
    if settings.bootstrap_servers:
        env["FEDSTREAM_BOOTSTRAP_SERVERS"] = settings.bootstrap_servers
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def test_report_writes_self_contained_html_with_readable_pngs_and_logs_them_to_mlflow(settings, events_file, tmp_path):
    out = tmp_path / "report"
    result = invoke(settings, "drift", "report", "--merchant", "m1", "--out", str(out), "--events", str(events_file))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["drift_events"] >= 1 and summary["merchants"][0]["merchant_id"] == "m1"
    assert 0.5 < summary["merchants"][0]["auc"] < 1.0
    page = (out / "index.html").read_text()
    referenced = re.findall(r"src='([^']+)'", page)
    assert sorted(referenced) == ["m1_features.png", "m1_performance.png"]
    for name in referenced:  # relative names of files in the same directory: the folder is self-contained
        assert (out / name).read_bytes()[:8] == PNG_MAGIC and (out / name).stat().st_size > 10_000
    assert "feature.price" in page and "<table>" in page
    assert "Injected drift (ground truth): prices from event 7000" in page
    drift_lines = (out / "drift-events.jsonl").read_text().splitlines()
    assert any(json.loads(line)["detector"].startswith("feature.price") for line in drift_lines)

    from registry.tracking import client

    artifacts = [a.path for a in client(settings).list_artifacts(summary["mlflow_run_id"], "drift-report/m1")]
    assert "drift-report/m1/m1_performance.png" in artifacts and "drift-report/m1/index.html" in artifacts


def test_report_table_covers_every_merchant_by_default_and_honours_since(settings, events_file, tmp_path):
    result = invoke(settings, "drift", "report", "--out", str(tmp_path / "all"), "--events", str(events_file),
                    "--no-mlflow", "--since", "2023-11-17T00:00:00")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert [m["merchant_id"] for m in summary["merchants"]] == ["m1", "m2"]
    assert summary["mlflow_run_id"] is None
    assert all(m["events"] < 16_000 for m in summary["merchants"])
    assert len(list((tmp_path / "all").glob("*.png"))) == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--merchant", "nobody"], "no events for merchant(s) nobody"),
        (["--since", "2031-01-01"], "no events at or after 2031-01-01"),
        (["--since", "last tuesday"], "neither epoch seconds nor an ISO date"),
    ],
)
def test_report_bad_input_is_a_clear_error(settings, events_file, tmp_path, args, message):
    result = invoke(settings, "drift", "report", "--out", str(tmp_path / "r"), "--events", str(events_file),
                    "--no-mlflow", *args)
    assert result.exit_code != 0
    assert message in result.output


def test_report_rejects_a_malformed_ground_truth_file(settings, events_file, tmp_path):
    truth = tmp_path / "truth.json"
    truth.write_text('{"drifts": [{"at_event": 3}]}')
    result = invoke(settings, "drift", "report", "--out", str(tmp_path / "r"), "--events", str(events_file),
                    "--no-mlflow", "--truth", str(truth))
    assert result.exit_code == 1 and "must list objects with merchant_id and timestamp" in result.output


def test_report_on_empty_or_broken_files_is_a_clear_error(settings, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = invoke(settings, "drift", "report", "--out", str(tmp_path / "r"), "--events", str(empty), "--no-mlflow")
    assert result.exit_code == 1 and "no click or order events" in result.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"type": "click"}\n')
    result = invoke(settings, "drift", "report", "--out", str(tmp_path / "r"), "--events", str(broken), "--no-mlflow")
    assert result.exit_code == 1 and "broken.jsonl:1: invalid event (missing_field)" in result.output
    result = invoke(settings, "drift", "report", "--out", str(tmp_path / "r"), "--events", str(tmp_path / "nope"))
    assert result.exit_code == 1 and "events file not found" in result.output


def test_monitor_reads_the_topics_publishes_drift_and_status_reads_it_back(kafka_settings, tmp_path):
    from streams.kafka import make_producer

    topics = kafka_settings.topics
    producer = make_producer(kafka_settings)
    for event in synthetic_events(n=16_000, seed=3, shift_merchant="m2", shift_at=6000, kind="prices"):
        topic = {"catalog": topics.catalog, "click": topics.clicks, "order": topics.orders}[
            type(event).__struct_config__.tag].name
        producer.send(topic, key=event.merchant_id.encode(), value=encode_event(event))
    producer.flush()
    producer.close()

    result = invoke(kafka_settings, "drift", "monitor", "--no-mlflow")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    assert lines[-1]["events"] == 16_000 and lines[-1]["drift_events"] >= 1
    assert {line["merchant_id"] for line in lines[:-1]} == {"m2"}

    status = json.loads(invoke(kafka_settings, "drift", "status", "--merchant", "m2", "--source", "kafka").output)
    assert status and all(d["merchant_id"] == "m2" for d in status)
    assert any(d["detector"].startswith("feature.price") for d in status)
    local = json.loads(invoke(kafka_settings, "drift", "status", "--source", "file").output)
    assert [d["detector"] for d in local] == [d["detector"] for d in status]


def test_drift_help_lists_the_subcommands(settings):
    result = invoke(settings, "drift", "--help")
    assert result.exit_code == 0
    for name in ("report", "monitor", "status"):
        assert name in result.output


def test_report_reads_what_fedstream_generate_writes(settings, tmp_path):
    events = tmp_path / "generated.jsonl"
    made = invoke(settings, "generate", "--events", "6000", "--merchants", "3", "--seed", "2", "--drift",
                  "m01:3000:prices", "--out", str(events))
    assert made.exit_code == 0, made.output
    result = invoke(settings, "drift", "report", "--merchant", "m01", "--out", str(tmp_path / "r"), "--events",
                    str(events), "--no-mlflow")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r" / "index.html").read_text()
    assert "Injected drift (ground truth): prices from event 3000" in page  # found <stem>.truth.json by itself
    assert (tmp_path / "r" / "m01_performance.png").read_bytes()[:8] == PNG_MAGIC


def test_report_renders_names_that_matplotlib_would_parse_as_math(settings, tmp_path):
    import msgspec

    from drift.report import write_report
    from streams.schemas import CatalogItem

    merchants = ("$\\frac{a}{b}$", "m_1^2")
    odd = {}

    def rename(event):
        if not isinstance(event, CatalogItem):
            return event
        name = odd.setdefault(event.category, ["$\\nosuchmacro{x}$", "m_1^2", "50$ off $^", "$x_{$"][len(odd) % 4]
                              + f" {len(odd)}")
        return msgspec.structs.replace(event, category=name)

    events = [rename(e) for e in synthetic_events(merchants=merchants, n=1500, seed=5)]
    report = write_report(settings, events, tmp_path / "report", mlflow=False)
    assert [row["merchant_id"] for row in report.summaries] == sorted(merchants)
    assert len(report.images) == 4 and all(p.read_bytes()[:8] == PNG_MAGIC for p in report.images)
    assert "$\\frac{a}{b}$" in (tmp_path / "report" / "index.html").read_text()
