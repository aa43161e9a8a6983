"""Streams throughput: generate, validate+serialize, produce, consume+validate through a real broker.

Runs kafka-python (with the crc32c extension) against an embedded tansu started in a temp dir and
stopped at the end. Each figure is events per second on this machine, single process:

* ``generate``          — synthetic events built by :mod:`streams.generator` (arrays -> event objects)
* ``validate``          — :func:`decode_event` on serialized bytes (one core)        target >= 200k/s
* ``serialize``         — :func:`encode_event` of event objects
* ``validate+serialize``— encode then decode (what the producer does for event objects)
* ``produce``           — :class:`EventProducer` (validate, route, key, acks=all, flush)
* ``produce_raw``       — peer: a bare kafka-python producer sending the same bytes, no validation
* ``consume``           — :class:`EventConsumer` batches (decode + validate + commit), after group join
* ``pipeline``          — produce and consume concurrently end to end: an :class:`EventProducer` in a
                          child process (validates, acks=all) and an :class:`EventConsumer` here
                          (validates again, commits), the broker a third process; events / (first send
                          -> last event consumed), both clocks CLOCK_MONOTONIC         target >= 20k/s
* ``pipeline_produce_only`` — the same run's producer: events / (first send -> all acknowledged)
* ``pipeline_cpu_us_*``  — CPU µs per event of producer, consumer and broker over the pipeline run
* ``pipeline_cores_busy``— their CPU seconds / elapsed seconds (this machine has ``cpus`` cores, shared)

``BENCH_QUICK=1`` uses fewer events (finishes in well under 2 minutes). Prints a table, then one JSON line.

    .venv/bin/python -m benchmarks.streams
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

QUICK = os.environ.get("BENCH_QUICK") == "1"
N_CODEC = 100_000 if QUICK else 400_000
N_KAFKA = 20_000 if QUICK else 100_000
N_PIPELINE = 60_000 if QUICK else 200_000
TARGETS = {"validate": 200_000, "pipeline": 20_000}


def _events(n: int):
    from streams.generator import GeneratorConfig, generate

    started = time.perf_counter()
    events = list(generate(GeneratorConfig(merchants=20, events=n, seed=1, items_per_merchant=(10, 60))))
    return events, len(events) / (time.perf_counter() - started)


def _rate(n: int, fn) -> float:
    started = time.perf_counter()
    fn()
    return n / (time.perf_counter() - started)


def codec_figures(events) -> dict[str, float]:
    from streams.schemas import decode_event, encode_event

    raws = [encode_event(e) for e in events]
    now = 2e9
    return {
        "validate": _rate(len(raws), lambda: [decode_event(r, now=now) for r in raws]),
        "serialize": _rate(len(events), lambda: [encode_event(e) for e in events]),
        "validate+serialize": _rate(len(events), lambda: [decode_event(encode_event(e), now=now) for e in events]),
    }


def _settings(bootstrap: str, data_dir: Path, tag: str):
    from fedstream.settings import Topic, Topics, load_settings

    topics = Topics(clicks=Topic(name=f"{tag}.clicks", partitions=8), orders=Topic(name=f"{tag}.orders", partitions=8),
                    catalog=Topic(name=f"{tag}.catalog", partitions=4),
                    dead_letter=Topic(name=f"{tag}.dead-letter", partitions=2), drift=Topic(name=f"{tag}.drift", partitions=1))
    return load_settings(data_dir=data_dir, bootstrap_servers=bootstrap, topics=topics)


def _produce(settings, raws: list[bytes]) -> float:
    from streams.producer import EventProducer

    started = time.perf_counter()
    producer = EventProducer(settings, source="bench", now=2e9, linger_ms=50)
    for raw in raws:
        producer.send_raw(raw)
    producer.close()
    assert producer.accepted == len(raws), producer.summary()
    return len(raws) / (time.perf_counter() - started)


def _produce_raw(settings, events, raws: list[bytes]) -> float:
    from streams.kafka import make_producer

    producer = make_producer(settings, linger_ms=50)
    topic = settings.topics.clicks.name
    started = time.perf_counter()
    for event, raw in zip(events, raws):
        producer.send(topic, value=raw, key=event.merchant_id.encode())
    producer.flush()
    rate = len(raws) / (time.perf_counter() - started)
    producer.close()
    return rate


def _consume(settings, expected: int, group: str) -> tuple[float, float]:
    """(events/s after the first record, seconds until the first record arrived)."""
    from streams.consumer import EventConsumer

    consumer = EventConsumer(settings, group, now=2e9, handle_signals=False, max_records=5000)
    created = time.perf_counter()
    first, seen = None, 0
    deadline = created + 300
    while seen < expected and time.perf_counter() < deadline:
        batch = consumer.poll(timeout_ms=1000)
        if batch.records and first is None:
            first = time.perf_counter()
            head = len(batch)
        seen += len(batch)
        consumer.commit(batch)
    consumer.close()
    assert seen == expected, (seen, expected)
    return (seen - head) / (time.perf_counter() - first), first - created


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _child_produce(bootstrap: str, data_dir: str, tag: str, raws: list[bytes], ready, go, results) -> None:
    """The producing side of the pipeline, in its own process: connect and fetch metadata first, then wait
    for ``go``; report (first send, all acknowledged, CPU seconds, accounting) on ``results``."""
    from streams.producer import EventProducer

    producer = EventProducer(_settings(bootstrap, Path(data_dir), tag), source="bench", now=2e9, linger_ms=50)
    producer.prefetch_metadata()
    ready.set()
    go.wait()
    cpu = time.process_time()
    first_send = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of this machine
    for raw in raws:
        producer.send_raw(raw)
    producer.close()  # flush: every record acknowledged (acks=all) or DeliveryFailed
    results.put({"first_send": first_send, "acked": time.monotonic(), "cpu_s": time.process_time() - cpu,
                 **producer.summary()})


def _pipeline(bootstrap: str, data_dir: Path, raws: list[bytes], broker_pid: int) -> dict[str, float]:
    """Producer (child process, validates) and consumer (this process, validates again) run concurrently
    against the broker (a third process). Rate = events / (first send -> last event consumed); CPU per
    event of each of the three processes over that window."""
    from streams.consumer import EventConsumer
    from streams.kafka import ensure_topics

    settings = _settings(bootstrap, data_dir, "bench-pipe")
    ensure_topics(settings)
    consumer = EventConsumer(settings, "bench-pipe", now=2e9, handle_signals=False, max_records=5000)
    while not consumer.assigned:  # join the group before the clock starts
        consumer.poll(timeout_ms=200)
    context = mp.get_context("spawn")
    ready, go, results = context.Event(), context.Event(), context.Queue()
    child = context.Process(target=_child_produce, args=(bootstrap, str(data_dir), "bench-pipe", raws, ready, go, results))
    child.start()
    if not ready.wait(120):
        raise RuntimeError("producer process did not start")
    expected = len(raws)
    broker_cpu, consumer_cpu = _cpu_seconds(broker_pid), time.process_time()
    go.set()
    seen = 0
    deadline = time.monotonic() + 300
    while seen < expected and time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=1000)
        seen += len(batch)
        consumer.commit(batch)
    last_consumed = time.monotonic()
    consumer_cpu = time.process_time() - consumer_cpu
    broker_cpu = _cpu_seconds(broker_pid) - broker_cpu
    produced = results.get(timeout=120)
    child.join(timeout=60)
    dead = consumer.dead_lettered
    consumer.close()
    assert seen == expected and dead == 0, (seen, dead, expected)
    assert produced["accepted"] == expected and produced["dead_lettered"] == 0, produced
    elapsed = last_consumed - produced["first_send"]
    per_event = {name: cpu / expected * 1e6 for name, cpu in
                 (("producer", produced["cpu_s"]), ("consumer", consumer_cpu), ("broker", broker_cpu))}
    return {"pipeline": expected / elapsed, "pipeline_produce_only": expected / (produced["acked"] - produced["first_send"]),
            **{f"pipeline_cpu_us_{name}": value for name, value in per_event.items()},
            "pipeline_cores_busy": (produced["cpu_s"] + consumer_cpu + broker_cpu) / elapsed}


def main() -> dict:
    from fedstream.processes import terminate
    from streams.broker import start_broker_process
    from streams.kafka import ensure_topics
    from streams.schemas import encode_event

    load_before = round(os.getloadavg()[0], 2)
    figures: dict[str, float] = {}
    events, figures["generate"] = _events(N_CODEC)
    figures.update(codec_figures(events))
    kafka_events = events[:N_KAFKA]
    raws = [encode_event(e) for e in kafka_events]
    pipeline_raws = [encode_event(e) for e in events[:N_PIPELINE]]
    with tempfile.TemporaryDirectory(prefix="fedstream-bench-") as tmp:
        proc, record = start_broker_process(Path(tmp) / "broker")
        try:
            settings = _settings(record.bootstrap, Path(tmp) / "data", "bench")
            ensure_topics(settings)
            figures["produce"] = _produce(settings, raws)
            figures["consume"], figures["group_join_s"] = _consume(settings, len(raws), "bench-consume")
            raw_settings = _settings(record.bootstrap, Path(tmp) / "data", "bench-raw")
            ensure_topics(raw_settings)
            figures["produce_raw"] = _produce_raw(raw_settings, kafka_events, raws)
            figures.update(_pipeline(record.bootstrap, Path(tmp) / "data", pipeline_raws, proc.pid))
        finally:
            terminate(proc.pid)
    _print_table(figures)
    result = {"benchmark": "streams", "quick": QUICK, "codec_events": len(events), "kafka_events": len(raws),
              "pipeline_events": len(pipeline_raws), "cpus": os.cpu_count(), "load_avg_1m_before": load_before,
              "load_avg_1m": round(os.getloadavg()[0], 2),
              **{k: round(v, 2) for k, v in figures.items()},
              "targets_met": {k: figures[k] >= v for k, v in TARGETS.items()}}
    result["readme"] = [{"row": f"streams: {name} events/s", "value": round(figures[name]),
                         "spread": f"load {result['load_avg_1m']}", "target": f">= {target:,.0f}",
                         "met": figures[name] >= target, "mode": "quick" if QUICK else "full",
                         "seeds": {"calibration": [], "report": []}, "date": time.strftime("%Y-%m-%d")}
                        for name, target in TARGETS.items()]
    print(json.dumps(result))
    return result


def _print_table(figures: dict[str, float]) -> None:
    print(f"{'measure':<26}{'value':>14}  target")
    for name, value in figures.items():
        unit = ("s" if name.endswith("_s") else "us/event" if "_cpu_us_" in name
                else "cores" if name.endswith("_cores_busy") else "events/s")
        target = f">= {TARGETS[name]:,} events/s" if name in TARGETS else ""
        print(f"{name:<26}{value:>14,.1f}  {unit:<9}{target}")


if __name__ == "__main__":
    main()
