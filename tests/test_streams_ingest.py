"""`fedstream ingest` under failure: acknowledged accounting, resume without duplicates, big dead letters, .gz."""

from __future__ import annotations

import gzip
import io
import json
import time

import msgspec
import pytest
from click.testing import CliRunner

from fedstream.cli import main
from fedstream.processes import terminate
from streams.broker import free_port, start_broker_process
from streams.kafka import make_consumer
from streams.commands import *  # noqa
from streams.producer import EventProducer, header_dict
from streams.schemas import decode_event, encode_event
from tests.test_streams_broker_down import own_broker_settings
from tests.test_streams_cli import CLEAN, drain, env_for, last_json_line
from tests.test_streams_pipeline import NOW, click_dict, valid_events

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588  # Apache Kafka's message.max.bytes


def record_size(message) -> int:
    return len(message.value) + sum(len(k) + len(v or b"") for k, v in message.headers) + len(message.key or b"")


def test_a_dead_letter_always_fits_kafkas_default_record_limit(kafka_settings, tmp_path):
    big = msgspec.json.encode(click_dict(query="z" * 1_500_000))  # forwarded whole (1.5 MB) before the fix
    lines = [encode_event(valid_events(3)[0]), big, encode_event(valid_events(3)[1])]
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    summary = last_json_line(CliRunner().invoke(main, ["ingest", str(path)], env=env_for(kafka_settings)))
    assert summary == {"accepted": 2, "dead_lettered": 1, "reasons": {"oversize": 1}, **CLEAN}
    (letter,) = drain(kafka_settings, kafka_settings.topics.dead_letter.name, 1)
    headers = header_dict(letter.headers)
    assert record_size(letter) < KAFKA_DEFAULT_MAX_MESSAGE_BYTES - 1024
    assert big.startswith(letter.value) and int(headers["original_size"]) == len(big) and headers["line"] == "2"


def test_a_dead_letter_the_broker_refuses_is_counted_not_fatal(kafka_settings):
    """A client that cannot send a 50 KB record (max_request_size): the dead letter fails, the events do not."""
    events = valid_events(40)
    with EventProducer(kafka_settings, now=NOW, max_request_size=20_000) as producer:
        producer.send_many(events[:20])
        assert producer.send_raw(msgspec.json.encode(click_dict(position="x" * 50_000))) is False
        producer.send_many(events[20:])
    assert producer.summary() == {"accepted": len(events), "dead_lettered": 0, "reasons": {"wrong_type": 1},
                                  "failed": 0, "dead_letter_failed": 1}
    assert sorted(m.value for m in drain(kafka_settings, kafka_settings.topics.clicks.name)) == sorted(
        encode_event(e) for e in events if type(e).__name__ == "Click")


def test_gzipped_input_is_read_not_dead_lettered(kafka_settings, tmp_path):
    events = valid_events(50)
    path = tmp_path / "events.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(encode_event(e) + b"\n" for e in events) + b"{broken\n"))
    summary = last_json_line(CliRunner().invoke(main, ["ingest", str(path)], env=env_for(kafka_settings)))
    assert summary == {"accepted": len(events), "dead_lettered": 1, "reasons": {"malformed_json": 1}, **CLEAN}
    stdin = last_json_line(CliRunner().invoke(main, ["ingest", "-"], input=path.read_bytes(), env=env_for(kafka_settings)))
    assert stdin == summary
    cut = CliRunner().invoke(main, ["ingest", "-"], input=path.read_bytes()[:-200], env=env_for(kafka_settings))
    assert cut.exit_code == 1 and "ingest stopped (input:" in cut.stderr and "Traceback" not in cut.output
    partial = json.loads(cut.stdout)  # every complete line before the cut was sent, resume at the next
    assert 0 < partial["accepted"] < len(events) and partial["resume_from_line"] == partial["accepted"] + 1


def test_line_ranges_round_trip():
    assert format_line_ranges([3, 4, 5, 9, 11, 12]) == "3-5,9,11-12"
    assert parse_line_ranges("3-5,9,11-12") == {3, 4, 5, 9, 11, 12} and parse_line_ranges("") == frozenset()


def drain_all(settings) -> list:
    """Every record on the event topics (until 2 s without any)."""
    topics = settings.topics
    consumer = make_consumer(settings, None, topics.clicks.name, topics.orders.name, topics.catalog.name)
    out, idle = [], 0
    while idle < 4:
        batch = consumer.poll(timeout_ms=500)
        idle = 0 if batch else idle + 1
        out += [record for records in batch.values() for record in records]
    consumer.close()
    return out


class _KillsTheBrokerHalfWay(io.BytesIO):
    """stdin that kills the broker (SIGKILL) once half of it has been read and the broker holds records
    (on a loaded machine the producer may not have sent anything yet at the half-way mark)."""

    def __init__(self, data: bytes, broker, settings) -> None:
        super().__init__(data)
        self.half, self.broker, self.settings = len(data) // 2, broker, settings

    def _wait_for_stored_records(self, timeout_s: float = 60.0) -> None:
        consumer = make_consumer(self.settings, None, self.settings.topics.clicks.name)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and not consumer.poll(timeout_ms=500):
                pass
        finally:
            consumer.close()
        time.sleep(1.0)  # let the acknowledgements of what is stored reach the producer

    def readinto(self, buffer) -> int:
        if self.broker is not None and self.tell() >= self.half:
            self._wait_for_stored_records()
            self.broker.kill()
            self.broker.wait()
            self.broker = None
        return super().readinto(buffer)


@pytest.mark.slow
def test_a_broker_dying_mid_file_ends_with_the_summary_and_a_resume_without_duplicates(settings, kafka_settings,
                                                                                       tmp_path):
    events = valid_events(6000, seed=8)
    lines = [encode_event(e) for e in events]
    for at in range(500, len(lines), 1000):  # a bad line now and then
        lines.insert(at, b"{broken")
    line_of = {decode_event(line).event_id: number for number, line in enumerate(lines, 1) if line != b"{broken"}
    data = b"\n".join(lines) + b"\n"
    port = free_port()
    proc, _ = start_broker_process(tmp_path / "dying", port=port)
    dying = own_broker_settings(settings, port)
    try:
        first = CliRunner().invoke(main, ["ingest", "-"], input=_KillsTheBrokerHalfWay(data, proc, dying),
                                   env={**env_for(dying), "FEDSTREAM_KAFKA__REQUEST_TIMEOUT_MS": "3000"})
    finally:
        terminate(proc.pid)
    assert first.exit_code == 1 and "resume with --from-line" in first.stderr and "Traceback" not in first.output
    summary = json.loads(first.stdout)
    resume, skip = summary["resume_from_line"], parse_line_ranges(summary["skip_lines"])
    assert 1 < resume < len(lines) and summary["failed"] > 0
    before = {n for n in line_of.values() if n < resume or n in skip}
    assert summary["accepted"] == len(before)  # acknowledged, not merely sent

    second = CliRunner().invoke(main, ["ingest", "-", "--from-line", str(resume), "--skip-lines", summary["skip_lines"]],
                                input=data, env=env_for(kafka_settings))
    rest = last_json_line(second)
    sent = [m.value for m in drain_all(kafka_settings)]
    resumed = [line_of[decode_event(value).event_id] for value in sent]
    assert len(resumed) == len(set(resumed)) == rest["accepted"]  # no duplicates
    assert set(resumed) | before == set(line_of.values()) and not set(resumed) & before  # each line once


def test_resume_point_skips_lines_acknowledged_after_the_first_failure(kafka_settings):
    """Batches of different partitions complete out of line order: a later line can be acknowledged while an
    earlier one failed; resuming at the earlier one must skip the later one."""
    producer = EventProducer(kafka_settings, now=NOW)
    try:
        assert producer.resume_point(None) == (None, []) and producer.resume_point(12) == (12, [])
        producer._account_lines([1, 2, 3], [])  # a flush with no failure: nothing to remember
        producer._account_lines([4, 7, 9], [5, 6])
        producer._account_lines([8, 10], [])  # the final flush after the failure
        assert producer.resume_point(None) == (5, [7, 8, 9, 10])
        assert producer.resume_point(11) == (5, [7, 8, 9, 10])
    finally:
        producer.close()
