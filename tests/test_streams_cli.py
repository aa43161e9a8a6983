"""`fedstream ingest | generate | replay` and the shipped data sets."""

from __future__ import annotations

import json
import time
from collections import Counter

import msgspec
import pytest
from click.testing import CliRunner

from fedstream.cli import main
from streams.commands import csv_row_to_json
from streams.datasets import DATASETS, cdnow_events, dataset_path, ecom_events, load
from streams.kafka import make_consumer
from streams.producer import header_dict
from streams.schemas import CatalogItem, Click, Order, decode_event, encode_event


CLEAN = {"failed": 0, "dead_letter_failed": 0, "resume_from_line": None, "skip_lines": ""}  # nothing left to resume


def env_for(settings) -> dict[str, str]:
    """The environment that makes the CLI use these settings (broker, data dir, this test's topics)."""
    env = {"FEDSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers or "", "FEDSTREAM_DATA_DIR": str(settings.data_dir)}
    for key in ("clicks", "orders", "catalog", "dead_letter", "drift"):
        topic = getattr(settings.topics, key)
        env[f"FEDSTREAM_TOPICS__{key.upper()}__NAME"] = topic.name
        env[f"FEDSTREAM_TOPICS__{key.upper()}__PARTITIONS"] = str(topic.partitions)
    return env


def last_json_line(result) -> dict:
    assert result.exit_code == 0, (result.output, result.exception)
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    assert len(lines) == 1  # exactly one JSON line on stdout; logs and progress go to stderr
    return json.loads(lines[0])


def drain(settings, topic, expected=None):
    consumer = make_consumer(settings, None, topic)
    out, idle = [], 0
    while idle < 6 and (expected is None or len(out) < expected):
        batch = consumer.poll(timeout_ms=500)
        idle = 0 if batch else idle + 1
        for records in batch.values():
            out.extend(records)
    consumer.close()
    return out


def test_ingest_jsonl_with_bad_lines_reports_exact_accounting(kafka_settings, tmp_path):
    good = Click(event_id="e1", merchant_id="m1", user_id="u1", item_id="i1", session_id="s1", timestamp=1.7e9,
                 position=0, page="home", device="app")
    lines = [encode_event(good), b"{broken", b'{"type": "click"}', b"\xff\xfe\xfd", b"",
             encode_event(Order(event_id="o1", order_id="o1", merchant_id="m1", user_id="u1", timestamp=1.7e9,
                                currency="EUR", items=[]))]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = last_json_line(CliRunner().invoke(main, ["ingest", str(path)], env=env_for(kafka_settings)))
    assert summary == {"accepted": 1, "dead_lettered": 4,
                       "reasons": {"malformed_json": 1, "missing_field": 1, "not_utf8": 1, "out_of_range": 1},
                       **CLEAN}
    letters = drain(kafka_settings, kafka_settings.topics.dead_letter.name, 4)
    assert sorted(m.value for m in letters) == sorted([lines[1], lines[2], lines[3], lines[5]])
    assert {header_dict(m.headers)["line"] for m in letters} == {"2", "3", "4", "6"}
    assert all(header_dict(m.headers)["source"] == "ingest:events.jsonl" for m in letters)


def test_ingest_csv_from_stdin_converts_types_and_keeps_original_lines(kafka_settings):
    header = "type,event_id,merchant_id,user_id,item_id,session_id,timestamp,position,page,device,clicked"
    rows = ["click,e1,m1,u1,i1,s1,1700000000,3,home,app,true",
            "click,e2,m1,u1,i1,s1,yesterday,3,home,app,false",
            "click,e3,m1,u1,i1,s1,1700000001,-4,home,app,1"]
    data = "\n".join([header, *rows]) + "\n"
    summary = last_json_line(CliRunner().invoke(main, ["ingest", "--format", "csv", "-"], input=data,
                                                env=env_for(kafka_settings)))
    assert summary == {"accepted": 1, "dead_lettered": 2, "reasons": {"out_of_range": 1, "wrong_type": 1}, **CLEAN}
    (click,) = drain(kafka_settings, kafka_settings.topics.clicks.name, 1)
    assert decode_event(click.value) == Click(event_id="e1", merchant_id="m1", user_id="u1", item_id="i1",
                                              session_id="s1", timestamp=1.7e9, position=3, page="home",
                                              device="app", clicked=True)
    letters = drain(kafka_settings, kafka_settings.topics.dead_letter.name, 2)
    assert sorted(m.value.decode() for m in letters) == sorted(rows[1:])


def test_csv_rows_become_typed_json():
    row = msgspec.json.decode(csv_row_to_json(["timestamp", "items", "clicked", "user_id", "price"],
                                              ["1.5", '[{"item_id": "i", "quantity": 2, "unit_price": 3}]', "false", "007", ""]))
    assert row == {"timestamp": 1.5, "items": [{"item_id": "i", "quantity": 2, "unit_price": 3}], "clicked": False,
                   "user_id": "007"}


def test_ingest_without_broker_is_a_clear_error(settings, tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("{}\n")
    env = {"FEDSTREAM_BOOTSTRAP_SERVERS": "127.0.0.1:1", "FEDSTREAM_DATA_DIR": str(tmp_path),
           "FEDSTREAM_KAFKA__BOOTSTRAP_TIMEOUT_MS": "1000"}
    result = CliRunner().invoke(main, ["ingest", str(path)], env=env)
    assert result.exit_code != 0 and "no Kafka broker reachable at 127.0.0.1:1" in result.stderr
    assert json.loads(result.stdout) == {"accepted": 0, "dead_lettered": 0, "reasons": {}, "failed": 0,
                                         "dead_letter_failed": 0, "resume_from_line": 1, "skip_lines": ""}


def test_generate_to_file_is_deterministic_and_writes_ground_truth(tmp_path):
    args = ["generate", "--merchants", "4", "--events", "3000", "--seed", "5", "--drift", "m02:2000:prices:0.5"]
    first = last_json_line(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "a.jsonl")],
                                              env={"FEDSTREAM_DATA_DIR": str(tmp_path)}))
    second = last_json_line(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "b.jsonl")],
                                               env={"FEDSTREAM_DATA_DIR": str(tmp_path)}))
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    events = [decode_event(line, now=2e9) for line in (tmp_path / "a.jsonl").read_bytes().splitlines()]
    assert sum(not isinstance(e, CatalogItem) for e in events) == 3000 == first["written"] - sum(
        isinstance(e, CatalogItem) for e in events)
    truth = json.loads((tmp_path / "a.truth.json").read_text())
    assert truth["drifts"] == first["ground_truth"] == second["ground_truth"]
    assert truth["drifts"][0]["merchant_id"] == "m02" and truth["drifts"][0]["at_event"] == 2000


def test_generate_rejects_a_bad_drift(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--merchants", "2", "--drift", "m09:10:prices", "--out",
                                       str(tmp_path / "x.jsonl")], env={"FEDSTREAM_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 2 and "m09" in result.output


def test_generate_and_replay_to_kafka(kafka_settings):
    env = env_for(kafka_settings)
    generated = last_json_line(CliRunner().invoke(main, ["generate", "--merchants", "3", "--events", "500",
                                                         "--seed", "2"], env=env))
    assert generated["dead_lettered"] == 0 and generated["accepted"] > 500
    replayed = last_json_line(CliRunner().invoke(main, ["replay", "cdnow", "--limit", "300"], env=env))
    assert replayed == {"dataset": "cdnow", "accepted": 300, "dead_lettered": 0, "reasons": {}, "failed": 0,
                        "dead_letter_failed": 0}
    orders = drain(kafka_settings, kafka_settings.topics.orders.name)
    cdnow = [m for m in orders if m.key == b"cdnow"]
    assert len(cdnow) == 300 and len({m.partition for m in cdnow}) == 1


def test_replay_ecom_to_file(tmp_path):
    out = tmp_path / "ecom.jsonl"
    summary = last_json_line(CliRunner().invoke(main, ["replay", "ecom", "--out", str(out)],
                                                env={"FEDSTREAM_DATA_DIR": str(tmp_path)}))
    assert summary["written"] == 31_106 + 19
    assert out.read_bytes().count(b"\n") == summary["written"]


# -- the data sets ------------------------------------------------------------------------------------------


def test_cdnow_is_replayed_completely_in_date_order():
    orders = list(cdnow_events())
    assert len(orders) == 69_659 and len({o.user_id for o in orders}) == 23_570
    assert len({o.event_id for o in orders}) == len(orders)
    stamps = [o.timestamp for o in orders]
    assert stamps == sorted(stamps)
    assert time.strftime("%Y-%m-%d", time.gmtime(stamps[0])) == "1997-01-01"
    assert time.strftime("%Y-%m-%d", time.gmtime(stamps[-1])) == "1998-06-30"
    assert sum(o.items[0].quantity for o in orders) == 167_881
    assert sum(o.total for o in orders) == pytest.approx(2_500_315.63, abs=1.0)  # unit prices are rounded
    for order in orders[::97]:
        assert decode_event(encode_event(order), now=2e9) == order


def test_ecom_sessions_become_page_clicks_with_an_exit_label():
    events = list(ecom_events())
    catalog = [e for e in events if isinstance(e, CatalogItem)]
    clicks = [e for e in events if isinstance(e, Click)]
    assert len(catalog) == 19 and len(clicks) == 31_106 and len(events) == len(catalog) + len(clicks)
    assert events[: len(catalog)] == catalog
    assert {c.item_id for c in clicks} <= {c.item_id for c in catalog}
    sessions = {c.session_id for c in clicks}
    assert len(sessions) == 3_605 and len({c.user_id for c in clicks}) == 600
    assert Counter(c.clicked for c in clicks)[False] == len(sessions)  # one exit per session
    assert [c.timestamp for c in clicks] == sorted(c.timestamp for c in clicks)
    assert Counter(c.device for c in clicks).keys() == {"desktop", "mobile", "tablet"}
    by_session: dict[str, list[Click]] = {}
    for c in clicks:
        by_session.setdefault(c.session_id, []).append(c)
    for session in list(by_session.values())[:200]:
        assert [c.position for c in session] == [min(k, 50) for k in range(len(session))]
    for click in clicks[::101]:
        decode_event(encode_event(click), now=2e9)


def test_datasets_are_found_without_importing_their_packages():
    import sys

    assert dataset_path("cdnow").name == "CDNOW_master.txt" and dataset_path("ecom").name == "ecom.csv.gz"
    assert "lifetimes" not in sys.modules and "retentioneering" not in sys.modules
    assert sum(1 for _ in load("cdnow", limit=10)) == 10
    with pytest.raises(ValueError, match="unknown data set"):
        list(load("netflix"))
    assert DATASETS == ("cdnow", "ecom", "movielens")
    assert dataset_path("movielens").name == "ml-100k.inter" and "recbole" not in sys.modules
