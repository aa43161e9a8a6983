"""The online worker on the real embedded broker: resume after kill -9 equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from fedstream.settings import Settings, Topic, Topics
from fedstream.files import write_atomic
from online.worker import OnlineWorker, WorkerConfig, read_checkpoint
from streams.generator import GeneratorConfig, generate
from streams.kafka import ensure_topics
from streams.producer import EventProducer

EVENTS = 8000


def single_partition_settings(settings: Settings, broker: str) -> Settings:
    """Clicks, orders and catalog on ONE single-partition topic: one total order, so equality is exact."""
    tag = f"online-{uuid.uuid4().hex[:8]}"
    events = Topic(name=f"{tag}.events", partitions=1)
    topics = Topics(clicks=events, orders=events, catalog=events,
                    dead_letter=Topic(name=f"{tag}.dead-letter", partitions=1), drift=Topic(name=f"{tag}.drift", partitions=1))
    configured = settings.model_copy(update={"bootstrap_servers": broker, "topics": topics})
    ensure_topics(configured, [events, topics.dead_letter, topics.drift])
    return configured


@pytest.fixture(scope="module")
def produced(broker, tmp_path_factory) -> tuple[Settings, int]:
    from fedstream.settings import load_settings

    base = load_settings(data_dir=tmp_path_factory.mktemp("online-data"), feature_bits=16)
    settings = single_partition_settings(base, broker)
    events = list(generate(GeneratorConfig(merchants=4, events=EVENTS, seed=21)))
    with EventProducer(settings, source="test-online") as producer:
        for event in events:
            producer.send_event(event)
    return settings, len(events)


def _config(tmp: Path, group: str, **extra) -> WorkerConfig:
    return WorkerConfig(model="ftrl", group=group, checkpoint_path=tmp / f"{group}.ckpt", block=64, flush_after_s=60.0,
                        checkpoint_every=500, checkpoint_seconds=3600, publish_every_s=None, publish_at_end=False,
                        idle_timeout_s=4.0, rank_every=20, **extra)


def _cli(settings: Settings, tmp: Path, group: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedstream"), "learn", "--model", "ftrl", "--group", group,
            "--topic", settings.topics.clicks.name, "--checkpoint", str(tmp / f"{group}.ckpt"), "--block", "64",
            "--flush-after", "60", "--checkpoint-every", "500", "--checkpoint-seconds", "3600", "--no-publish",
            "--idle-timeout", "4", "--rank-every", "20"]


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    env.update(FEDSTREAM_BOOTSTRAP_SERVERS=settings.bootstrap_servers, FEDSTREAM_DATA_DIR=str(settings.data_path),
               FEDSTREAM_FEATURE_BITS=str(settings.feature_bits),
               FEDSTREAM_TOPICS__DEAD_LETTER__NAME=settings.topics.dead_letter.name,
               FEDSTREAM_TOPICS__DEAD_LETTER__PARTITIONS="1")
    return env


@pytest.mark.slow
def test_kill_9_mid_stream_then_resume_equals_uninterrupted_run(produced, tmp_path):
    settings, total = produced
    reference = OnlineWorker(settings, _config(tmp_path, "reference"), monitors={"drift": _drift_monitor(settings)})
    summary = reference.run()
    assert summary["events"] == total and summary["stopped"] == "idle"

    command, env = _cli(settings, tmp_path, "crashy"), _env(settings)
    path = tmp_path / "crashy.ckpt"
    victim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not path.exists() and time.monotonic() < deadline and victim.poll() is None:
        time.sleep(0.005)
    os.kill(victim.pid, signal.SIGKILL)  # no goodbye: no final checkpoint, no offset commit, no group leave
    victim.wait(timeout=30)
    crashed_at = read_checkpoint(path)
    assert crashed_at is not None and 0 < crashed_at["events"] < total, "the kill did not land mid-stream"

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["learned_this_run"] == total - crashed_at["events"]  # resumed exactly where the file said

    mine, theirs = read_checkpoint(path), read_checkpoint(reference.checkpoint_path)
    assert mine["events"] == theirs["events"] == total
    assert mine["offsets"] == theirs["offsets"]
    for name in ("w", "z", "n"):
        np.testing.assert_array_equal(getattr(mine["model"], name), getattr(theirs["model"], name))
    assert mine["model"].n_updates == theirs["model"].n_updates == mine["clicks"]
    assert mine["evaluator"].report() == theirs["evaluator"].report()
    assert mine["evaluator"].per_merchant() == theirs["evaluator"].per_merchant()
    assert mine["context"] == theirs["context"]
    assert _recommender_facts(mine["recommender"]) == _recommender_facts(theirs["recommender"])
    # the CLI worker's drift detectors (on by default) were checkpointed with the model and resumed with it
    assert _drift_facts(settings, mine["monitors"]["drift"]) == _drift_facts(settings, theirs["monitors"]["drift"])
    mine.pop("written_at"), theirs.pop("written_at")
    _same(mine, theirs)  # and every other field of the snapshot, detectors' internals included


def _drift_monitor(settings: Settings):
    """The CLI worker's drift monitor (``learner_monitor_factory`` without its sinks): error detectors only."""
    from drift.monitor import prediction_monitor

    return lambda snapshot: prediction_monitor(settings, snapshot)


def _drift_facts(settings: Settings, snapshot: bytes) -> dict:
    monitor = _drift_monitor(settings)(snapshot)
    assert monitor.detectors, "the drift monitor saw no predictions"
    return {m: monitor.state(m) for m in monitor.detectors} | {"predictions": monitor._predictions}


def _recommender_facts(recommender) -> dict:
    """Everything the two-stage recommender holds: candidate sources (dataclasses compare field by field;
    users in LRU order), ranker weights and AdaGrad sums, and the negative sampler's state."""
    ranker = recommender.ranker
    return {"shops": recommender.state.shops, "users": {m: list(s.users) for m, s in recommender.state.shops.items()},
            "weights": ranker.weights.tolist(), "squares": ranker.squares.tolist(), "updates": ranker.updates,
            "merchants": {m: (w.tolist(), sq.tolist()) for m, (w, sq) in ranker.merchants.items()},
            "rng": recommender.rng.getstate(), "steps": recommender.steps}


def test_worker_learns_publishes_and_resumes_without_relearning(produced, tmp_path):
    settings, total = produced
    stop_after = total - EVENTS // 2  # catalog events come first: stop half way through clicks and orders
    config = _config(tmp_path, "publisher", max_events=stop_after)
    config.publish_at_end = True
    first = OnlineWorker(settings, config).run()
    assert first["stopped"] == "max_events" and first["learned_this_run"] == stop_after  # exactly, whatever the poll size
    assert first["published_versions"] == ["1"], first["publish_errors"]
    assert first["rolling_auc"] > 0.6 and 0 < first["prequential_logloss"] < 0.6

    from registry.models import load_bundle

    bundle = load_bundle(settings, f"models:/{settings.serving.model_name}@challenger")
    assert type(bundle.model).__name__ == "LinearScorer"  # serving gets FTRL's weights only, not z and n
    merchant = bundle.merchants()[0]
    ranked = bundle.recommend(merchant, "nobody", k=5)
    assert len(ranked) == 5 and all(0 < p < 1 for _, p in ranked)

    config = _config(tmp_path, "publisher")
    recorder = _PredictionRecorder()
    second = OnlineWorker(settings, config, monitors={"recorder": lambda snapshot: recorder})
    assert second.state.events == first["events"]  # restored, and the pending records were not checkpointed
    summary = second.run()
    assert summary["events"] == total and summary["learned_this_run"] == total - first["events"]
    errors = recorder.errors
    assert len(errors) == summary["clicks"] - first["clicks"]  # one (merchant, t, y, p) per click learned
    merchant_id, timestamp, y, p = errors[-1]
    assert merchant_id.startswith("m") and timestamp > 1.6e9 and isinstance(y, bool) and 0 < p < 1


class _PredictionRecorder:
    """A PredictionMonitor that keeps every (merchant, timestamp, y, p) it is shown."""

    def __init__(self) -> None:
        self.errors: list[tuple] = []

    def observe_predictions(self, merchant_ids, timestamps, y, p) -> None:
        self.errors.extend(zip(merchant_ids, timestamps, y.tolist(), p.tolist()))

    def snapshot(self) -> bytes:
        return b""

    def adopt_merchants(self, snapshot, owned) -> None:
        """Nothing per merchant to take: a recorder keeps only what it was shown."""

    def close(self) -> None:
        pass


def test_checkpoint_of_another_model_is_refused_and_writes_are_atomic(settings, tmp_path):
    path = tmp_path / "x.ckpt"
    worker = OnlineWorker(settings, WorkerConfig(model="adam", checkpoint_path=path, publish_every_s=None))
    worker.checkpoint(commit=False)
    assert not list(tmp_path.glob(".x.ckpt.*"))  # no temp file left behind
    with pytest.raises(ValueError, match="holds adam"):
        OnlineWorker(settings, WorkerConfig(model="ftrl", checkpoint_path=path))
    write_atomic(path, b"replaced")
    assert path.read_bytes() == b"replaced"
    with pytest.raises(ValueError):
        WorkerConfig(block=0)


def test_learn_cli_help_and_bad_params():
    from click.testing import CliRunner

    from fedstream.cli import main

    runner = CliRunner()
    assert "--max-events" in runner.invoke(main, ["learn", "--help"]).output
    bad = runner.invoke(main, ["learn", "--param", "novalue"])
    assert bad.exit_code != 0 and "KEY=VALUE" in bad.output


def test_partial_blocks_wait_unless_the_partition_is_caught_up(settings, tmp_path):
    from kafka import TopicPartition

    from streams.consumer import Record
    from streams.schemas import Click

    clicks = [e for e in generate(GeneratorConfig(merchants=2, events=300, seed=5)) if isinstance(e, Click)][:100]
    worker = OnlineWorker(settings, WorkerConfig(model="ftrl", checkpoint_path=tmp_path / "w.ckpt", block=64,
                                                 flush_after_s=3600, publish_every_s=None))
    now_ms = int(time.time() * 1000)
    worker.accept([Record(c, "clicks", 0, offset, now_ms, None) for offset, c in enumerate(clicks)])
    assert worker.state.events == 64 and len(worker.pending[("clicks", 0)]) == 36  # block cut at offset 64
    worker.flush_caught_up({TopicPartition("clicks", 0): 3})  # records still to read: keep waiting
    assert worker.state.events == 64
    worker.flush_caught_up({TopicPartition("clicks", 0): 0, TopicPartition("clicks", 1): 0})
    assert worker.state.events == 100 and worker.state.offsets[("clicks", 0)] == 100 and not worker.pending
    metrics = worker.metrics()
    assert 0 <= metrics["latency_p50_s"] <= metrics["latency_p95_s"] <= metrics["latency_max_s"] < 60


def test_scheduled_publication_registers_a_snapshot_while_learning_goes_on(settings, tmp_path):
    from registry.models import load_bundle, version_lineage
    from registry.tracking import client
    from streams.consumer import Record

    events = list(generate(GeneratorConfig(merchants=2, events=1200, seed=9)))
    records = [Record(e, "events", 0, offset, int(time.time() * 1000), None) for offset, e in enumerate(events)]
    worker = OnlineWorker(settings, WorkerConfig(model="ftrl", checkpoint_path=tmp_path / "p.ckpt", block=64,
                                                 publish_every_s=1.0))
    worker.prepare_publishing()
    half = (len(records) + [type(e).__name__ for e in events].index("Click")) // 2  # half of the clicks and orders
    worker.accept(records[:half])
    worker.publisher.last_publish -= 10  # the schedule is due
    worker._maybe_publish()
    published_at, weights_at = worker.state.events, worker.state.model.w.astype(np.float32)
    assert worker.publisher.thread is not None and worker.publisher.thread.is_alive()
    worker.accept(records[half:])  # learning goes on while the snapshot is registered
    worker.flush_stale(force=True)
    worker.publisher.join(timeout=120)
    assert worker.published == ["1"], worker.publish_errors
    assert worker.state.events == len(events) > published_at

    version = client(settings).get_model_version(settings.serving.model_name, "1")
    assert version_lineage(version)["events_seen"] == published_at  # the snapshot, not the state at registration
    bundle = load_bundle(settings, f"models:/{settings.serving.model_name}/1")
    np.testing.assert_array_equal(bundle.model.weights, weights_at)
    assert not np.array_equal(worker.state.model.w.astype(np.float32), weights_at)


# -- kill -9 at seeded random points over several partitions, full snapshots compared ------------------------
# Across partitions the order in which blocks reach the model depends on fetch timing, so two Kafka runs are
# not bit-comparable. Here the records are read once from the broker (several partitions, keyed by merchant)
# and fed to a real OnlineWorker in a fixed interleaving (round robin over partitions, one block each, the
# worker's own accept / checkpoint calls, background checkpoint writes included); a child process running
# that schedule SIGKILLs itself at seeded random blocks, several times in a row, and each restart resumes from
# whatever checkpoint landed. The final checkpoint must equal an uninterrupted run's in every field.

PARTITIONS, BLOCK, CHECKPOINT_EVERY = 3, 64, 300


def _schedule(records: list) -> list[list]:
    """Blocks of ``BLOCK`` offsets per partition, taken round robin over the partitions."""
    by_partition: dict[int, list] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_partition.setdefault(record.partition, []).append(record)
    blocks = {p: [rs[i:i + BLOCK] for i in range(0, len(rs), BLOCK)] for p, rs in sorted(by_partition.items())}
    return [blocks[p][k] for k in range(max(len(b) for b in blocks.values())) for p in blocks if k < len(blocks[p])]


def _scheduled_worker_config(checkpoint: Path) -> WorkerConfig:
    return WorkerConfig(model="ftrl", group="scheduled", checkpoint_path=checkpoint, block=BLOCK, flush_after_s=3600,
                        checkpoint_every=CHECKPOINT_EVERY, checkpoint_seconds=3600, publish_every_s=None,
                        publish_at_end=False, rank_every=20)


def learn_in_schedule(settings: Settings, records: list, checkpoint: Path, crash_at: int | None = None) -> dict:
    """Feed the schedule to a (resumed) worker; ``crash_at``: SIGKILL this process at that block."""
    worker = OnlineWorker(settings, _scheduled_worker_config(checkpoint), monitors={"drift": _drift_monitor(settings)})
    for number, block in enumerate(_schedule(records)):
        if number == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # no goodbye: a background checkpoint write may be in flight
        worker.accept(block)  # blocks learned before the checkpoint are skipped by offset
        worker._maybe_checkpoint()
    worker.flush_stale(force=True)
    worker.checkpoint(commit=False)
    return {"events": worker.state.events, "learned_this_run": worker.learned_this_run}


def _child_main() -> None:
    """``python -c`` entry of the crashing child: argv = data dir, records pickle, checkpoint, crash block."""
    import pickle

    from fedstream.settings import load_settings

    data_dir, records_file, checkpoint, crash_at = sys.argv[1:5]
    settings = load_settings(data_dir=data_dir, feature_bits=16)
    records = pickle.loads(Path(records_file).read_bytes())
    print(json.dumps(learn_in_schedule(settings, records, Path(checkpoint), int(crash_at) if crash_at != "-" else None)))


def _same(mine, theirs, path: str = "checkpoint") -> None:
    """Field-by-field equality of two checkpoints (arrays exactly, objects by their attributes)."""
    import pickle

    if isinstance(mine, bytes) and isinstance(theirs, bytes) and mine[:1] == b"\x80":  # a nested snapshot
        mine, theirs = pickle.loads(mine), pickle.loads(theirs)
    if isinstance(mine, np.ndarray) or isinstance(theirs, np.ndarray):
        np.testing.assert_array_equal(mine, theirs, err_msg=path)
    elif isinstance(mine, dict) and isinstance(theirs, dict):
        assert list(mine) == list(theirs), path
        for key in mine:
            _same(mine[key], theirs[key], f"{path}[{key!r}]")
    elif isinstance(mine, (list, tuple, deque)) and isinstance(theirs, (list, tuple, deque)):
        assert type(mine) is type(theirs) and len(mine) == len(theirs), path
        for k, (a, b) in enumerate(zip(mine, theirs)):
            _same(a, b, f"{path}[{k}]")
    elif hasattr(mine, "__dict__") and type(mine) is type(theirs) and not isinstance(mine, type):
        _same(vars(mine), vars(theirs), f"{path}.{type(mine).__name__}")
        slots = [s for cls in type(mine).__mro__ for s in getattr(cls, "__slots__", ())]
        for name in slots:
            _same(getattr(mine, name, None), getattr(theirs, name, None), f"{path}.{name}")
    elif type(mine).__module__ not in ("builtins", "collections") and type(mine) is type(theirs):
        assert pickle.dumps(mine) == pickle.dumps(theirs), path  # e.g. compiled detectors without __dict__
    else:
        assert mine == theirs, path


@pytest.fixture(scope="module")
def partitioned(broker, tmp_path_factory) -> tuple[Settings, Path, int]:
    """6 merchants' events on a 3-partition topic (keyed by merchant), read back once, pickled for children."""
    import pickle

    from fedstream.settings import load_settings
    from streams.consumer import EventConsumer

    data_dir = tmp_path_factory.mktemp("partitioned")
    tag = f"multi-{uuid.uuid4().hex[:8]}"
    events_topic = Topic(name=f"{tag}.events", partitions=PARTITIONS)
    topics = Topics(clicks=events_topic, orders=events_topic, catalog=events_topic,
                    dead_letter=Topic(name=f"{tag}.dead-letter", partitions=1), drift=Topic(name=f"{tag}.drift", partitions=1))
    settings = load_settings(data_dir=data_dir, feature_bits=16).model_copy(update={"bootstrap_servers": broker, "topics": topics})
    ensure_topics(settings, [events_topic, topics.dead_letter, topics.drift])
    events = list(generate(GeneratorConfig(merchants=6, events=4000, seed=33)))
    with EventProducer(settings, source="test-multi") as producer:
        for event in events:
            producer.send_event(event)
    consumer = EventConsumer(settings, f"read-{tag}", [events_topic.name], poll_timeout_ms=500)
    records, deadline = [], time.monotonic() + 120
    try:
        while len(records) < len(events) and time.monotonic() < deadline:
            records.extend(consumer.poll().records)
    finally:
        consumer.close()
    assert len(records) == len(events) and len({r.partition for r in records}) == PARTITIONS
    path = data_dir / "records.pickle"
    path.write_bytes(pickle.dumps(records))
    return settings, path, len(records)


@pytest.mark.slow
def test_kill_9_at_random_points_over_several_partitions_then_resume_equals_uninterrupted(partitioned, tmp_path):
    import pickle

    settings, records_file, total = partitioned
    records = pickle.loads(records_file.read_bytes())
    blocks = len(_schedule(records))
    reference = learn_in_schedule(settings, records, tmp_path / "reference.ckpt")
    assert reference["events"] == total

    crashes = sorted(np.random.default_rng(2024).choice(np.arange(3, blocks - 1), size=3, replace=False).tolist())
    checkpoint, resumed_at = tmp_path / "crashy.ckpt", []
    code = "from tests.test_online_worker import _child_main; _child_main()"
    for crash_at in [*crashes, None]:
        args = [sys.executable, "-c", code, str(settings.data_path), str(records_file), str(checkpoint),
                "-" if crash_at is None else str(crash_at)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=180)
        saved = read_checkpoint(checkpoint)
        if crash_at is not None:
            assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
            resumed_at.append(saved["events"] if saved else 0)
        else:
            assert done.returncode == 0, done.stderr[-2000:]
            assert json.loads(done.stdout.strip().splitlines()[-1])["learned_this_run"] == total - resumed_at[-1]
    assert 0 < resumed_at[0] and resumed_at == sorted(resumed_at) and resumed_at[-1] < total, resumed_at
    mine, theirs = read_checkpoint(checkpoint), read_checkpoint(tmp_path / "reference.ckpt")
    mine.pop("written_at"), theirs.pop("written_at")
    assert len(mine["offsets"]) == PARTITIONS and mine["events"] == total
    _same(mine, theirs)


def test_text_candidates_embed_the_catalog_in_the_worker_and_publish_it(settings, tmp_path):
    """`learn --text-candidates`: every catalog item embedded once in the worker; the published recommender
    proposes the new items whose text is closest to a user's recent items (their categories, on the
    generated stream's titles), without embedding anything itself."""
    from online import publishing
    from streams.consumer import Record
    from streams.schemas import CatalogItem

    events = list(generate(GeneratorConfig(merchants=2, events=1500, seed=9, items_per_merchant=(20, 40))))
    records = [Record(e, "events", 0, offset, int(time.time() * 1000), None) for offset, e in enumerate(events)]
    worker = OnlineWorker(settings, WorkerConfig(model="ftrl", checkpoint_path=tmp_path / "t.ckpt", block=64,
                                                 publish_every_s=None, text_candidates=True))
    worker.accept(records)
    worker.flush_stale(force=True)
    state = publishing.snapshot(worker.state, worker.config, worker.metrics())["bundle"].recommender.state
    category = {(e.merchant_id, e.item_id): e.category for e in events if isinstance(e, CatalogItem)}
    agree, base = [], []
    for merchant, shop in state.shops.items():
        assert not shop.pending and set(shop.text_items) == {i for m, i in category if m == merchant}
        for user in shop.users.values():
            liked = {category[(merchant, i)] for i in user.recent}
            agree += [category[(merchant, i)] in liked for i in state.cold_start(shop, user, 3)]
            base += [category[(merchant, i)] in liked for i in shop.unchosen]
    assert state.encoder is None and len(agree) > 50
    assert np.mean(agree) > 1.5 * np.mean(base), (np.mean(agree), np.mean(base))
