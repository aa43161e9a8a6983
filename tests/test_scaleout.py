"""Scale-out: 3 learners in one group over 8 partitions, one killed -9 mid-stream, one coherent served model.

The topics are laid out as in production (clicks and orders on 8 partitions, the catalog on 4, so the
catalog is read outside the group). The stream holds the catalog and clicks only: each merchant's events
then have one total order (its clicks partition), so its per-merchant state can be compared bit for bit
with a single worker's; orders take the same path (same slot, same topic layout) and are not needed for that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fedstream.metrics import roc_auc
from fedstream.settings import Settings, Topic, Topics, load_settings
from online.assembly import assemble
from online.publishing import assembled_snapshot, snapshot
from online.slices import newest, read_store, slot_of
from online.store import DirectoryStore
from online.worker import CHECKPOINT_VERSION, OnlineWorker, WorkerConfig, read_checkpoint
from streams.generator import GeneratorConfig, generate
from streams.kafka import ensure_topics
from streams.producer import EventProducer
from streams.schemas import CatalogItem, Click

MERCHANTS, EVENTS, WORKERS = 12, 12_000, 3
LEARN = ["--model", "ftrl", "--block", "64", "--flush-after", "0.5", "--checkpoint-every", "200",
         "--checkpoint-seconds", "1", "--publish-every", "3", "--drift", "--rank-every", "0"]


@pytest.fixture(scope="module")
def stream(broker, tmp_path_factory) -> tuple[Settings, list, list, list]:
    tag = f"scale-{uuid.uuid4().hex[:8]}"
    topics = Topics(clicks=Topic(name=f"{tag}.clicks", partitions=8), orders=Topic(name=f"{tag}.orders", partitions=8),
                    catalog=Topic(name=f"{tag}.catalog", partitions=4),
                    dead_letter=Topic(name=f"{tag}.dead-letter", partitions=1), drift=Topic(name=f"{tag}.drift", partitions=1))
    settings = load_settings(data_dir=tmp_path_factory.mktemp("scaleout"), feature_bits=16).model_copy(
        update={"bootstrap_servers": broker, "topics": topics})
    ensure_topics(settings)
    events = list(generate(GeneratorConfig(merchants=MERCHANTS, events=EVENTS, seed=14, items_per_merchant=(30, 300))))
    clicks = [e for e in events if type(e) is Click]
    split = int(len(clicks) * 0.85)  # the rest is held out: the served models are scored on it
    return settings, [e for e in events if type(e) is CatalogItem], clicks[:split], clicks[split:]


def _produce(settings: Settings, events: list) -> None:
    with EventProducer(settings, source="test-scaleout") as producer:
        for event in events:
            producer.send_event(event)


def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSTREAM_")}
    env.update(FEDSTREAM_BOOTSTRAP_SERVERS=settings.bootstrap_servers, FEDSTREAM_DATA_DIR=str(settings.data_path),
               FEDSTREAM_FEATURE_BITS=str(settings.feature_bits))
    for kind in ("clicks", "orders", "catalog", "dead_letter", "drift"):
        topic = getattr(settings.topics, kind)
        env[f"FEDSTREAM_TOPICS__{kind.upper()}__NAME"] = topic.name
        env[f"FEDSTREAM_TOPICS__{kind.upper()}__PARTITIONS"] = str(topic.partitions)
    return env


def _assignments(logs: list[Path]) -> list[set[int] | None]:
    """Each worker's latest clicks partitions, from its "partitions assigned" log lines."""
    out: list[set[int] | None] = []
    for path in logs:
        latest = None
        for line in path.read_text().splitlines():
            if '"partitions assigned"' in line:
                latest = {int(p.rsplit(":", 1)[1]) for p in json.loads(line)["partitions"] if ".clicks:" in p}
        out.append(latest)
    return out


def _wait(condition, timeout: float, what: str, every: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _learned(store: Path) -> int:
    """Events learned in the newest copy of every slot, as the store's checkpoints say now."""
    peers = read_store(DirectoryStore(store), CHECKPOINT_VERSION)
    return sum(peers[path]["slots"][slot] for slot, path in newest(peers).items())


def _reference(settings: Settings, tmp: Path) -> OnlineWorker:
    """The same stream learned by one worker alone (its own group and store)."""
    config = WorkerConfig(model="ftrl", group="scaleout-single", store=tmp / "single", block=64, flush_after_s=0.5,
                          checkpoint_every=200, checkpoint_seconds=1, publish_every_s=None, publish_at_end=False,
                          rank_every=0, idle_timeout_s=3.0)
    worker = OnlineWorker(settings, config)
    worker.run()
    return worker


@pytest.mark.slow
def test_three_learners_one_killed_serve_one_model_equal_to_a_single_worker(stream, tmp_path):
    from registry.models import latest_version, list_versions, load_bundle, promote

    settings, catalog, train, held_out = stream
    _produce(settings, catalog)
    store, group = tmp_path / "store", "scaleout-group"
    command = [str(Path(sys.executable).parent / "fedstream"), "learn", *LEARN, "--group", group, "--store", str(store),
               "--idle-timeout", "60"]  # a safety net: they are stopped (SIGTERM) once the store holds every event
    logs = [tmp_path / f"worker-{i}.log" for i in range(WORKERS)]
    workers = [subprocess.Popen([*command, "--worker-id", str(i)], env=_env(settings), stdout=subprocess.PIPE,
                                stderr=logs[i].open("w"), start_new_session=True) for i in range(WORKERS)]
    try:
        def split_three_ways() -> bool:
            parts = _assignments(logs)
            return all(parts) and sorted(p for part in parts for p in part) == list(range(8))

        _wait(split_three_ways, 120, "the group to give every worker its partitions")
        _produce(settings, train[: len(train) // 2])
        victim = store / "2.ckpt"
        # a checkpoint with clicks or orders of its own slots (its catalog alone, or the one written when the
        # partitions were assigned, would leave nothing to resume: under load that was its first checkpoint)
        _wait(lambda: any((read_checkpoint(victim) or {}).get("slots", {}).values()), 60,
              "worker 2's first checkpoint with events of its slots")
        os.kill(workers[2].pid, signal.SIGKILL)  # no goodbye: no final checkpoint, no commit, no group leave
        workers[2].wait(timeout=30)
        _produce(settings, train[len(train) // 2:])
        _wait(lambda: _learned(store) == len(train), 120, "the survivors' checkpoints to hold every event", every=0.5)
        for worker in workers[:2]:
            os.kill(worker.pid, signal.SIGTERM)  # a graceful stop: final checkpoint, leave the group
        outputs = [w.communicate(timeout=120)[0] for w in workers[:2]]
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
    assert [w.returncode for w in workers] == [0, 0, -signal.SIGKILL], [path.read_text()[-2000:] for path in logs]
    summaries = [json.loads(out.decode().strip().splitlines()[-1]) for out in outputs]

    # the dead worker's partitions moved: their newest copies are a survivor's, learned past the kill
    dead, peers = read_checkpoint(store / "2.ckpt"), read_store(DirectoryStore(store), CHECKPOINT_VERSION)
    owners = newest(peers)
    moved = [s for s, n in dead["slots"].items() if owners[s] != "2.ckpt" and peers[owners[s]]["slots"][s] > n]
    assert moved, f"no partition of the killed worker was resumed by a survivor: {dead['slots']}"
    assert any("adopted_slots" in line and '"adopted_slots": []' not in line
               for path in logs[:2] for line in path.read_text().splitlines()), "no survivor adopted a slot"

    # every produced event learned exactly once: per-merchant counts over the newest slots
    parts = assemble(peers)
    produced = Counter(e.merchant_id for e in train)
    assert parts["merchant_events"] == dict(produced)
    assert sum(peers[owners[s]]["slots"][s] for s in owners) == len(train)
    assert parts["events"] == len(train) + len(catalog)  # the catalog, read whole by each worker, counted once
    assert sum(s["learned_this_run"] for s in summaries) + sum(dead["slots"].values()) >= len(train)

    # per-merchant state equals one worker's: feature context, candidate sources, steps
    single = _reference(settings, tmp_path)
    assert single.state.merchant_events == dict(produced)
    mine, theirs = parts["context"].state()["merchants"], single.state.context.state()["merchants"]
    assert sorted(mine) == sorted(theirs) and all(mine[m] == theirs[m] for m in theirs)
    shops, reference_shops = parts["recommender"].state.shops, single.state.recommender.state.shops
    assert sorted(shops) == sorted(reference_shops)
    for merchant, shop in reference_shops.items():
        assert shops[merchant] == shop and list(shops[merchant].users) == list(shop.users), merchant
    assert parts["recommender"].merchant_steps == single.state.recommender.merchant_steps

    # the drift detectors moved with their slots: in the newest copy of its slot, each merchant's detectors
    # saw each of its clicks (the stream produced only clicks) once: a moved merchant's did not start again
    from drift.monitor import DriftMonitor

    for slot, path in owners.items():
        monitor = DriftMonitor.restore(settings, peers[path]["monitors"]["drift"])
        for merchant in [m for m in produced if slot_of(m, 8) == slot]:
            seen = monitor._predictions.get(merchant), monitor.state(merchant)["error.page_hinkley"]["n_seen"]
            assert seen == (produced[merchant], produced[merchant]), (merchant, slot, path)

    # the learners registered one version per interval for the group (slot 0's holder) and at their ends,
    # never one equal to the latest but in a race (the two survivors stop together): the last holds
    # every final checkpoint; it is promoted, loaded as `fedstream serve` does, answers for every merchant
    assert not any(s["publish_errors"] for s in summaries), [s["publish_errors"] for s in summaries]
    config = WorkerConfig(model="ftrl", group=group)
    taken = assembled_snapshot(store, config, {})
    assert taken["lineage"]["shared_weights"] == "slot-activity-weighted" and len(taken["lineage"]["assembled_from"]) == 3
    name = settings.serving.model_name
    generations = [json.dumps(row["lineage"]["generation"], sort_keys=True) for row in list_versions(settings, name)]
    assert generations[0] == json.dumps(taken["lineage"]["generation"], sort_keys=True), generations
    assert len(generations) <= len(set(generations)) + 1, generations
    version = latest_version(settings, name)
    assert promote(settings, name, version.version, force=True).moved
    served = load_bundle(settings, f"models:/{name}@champion")
    for merchant in sorted(produced):
        user = next(e.user_id for e in reversed(train) if e.merchant_id == merchant)
        assert served.recommend_items(merchant, user, k=5), merchant

    # the merged shared weights, documented against the single worker: AUC on held-out clicks
    labels = np.array([e.clicked for e in held_out], dtype=float)
    alone = snapshot(single.state, single.config, {})["bundle"]
    auc_merged, auc_single = roc_auc(labels, served.predict(held_out)), roc_auc(labels, alone.predict(held_out))
    print(json.dumps({"auc_merged": auc_merged, "auc_single": auc_single, "moved_slots": moved,
                      "versions": len(generations), "generations": len(set(generations)),
                      "registered": [s["published_versions"] for s in summaries],
                      "unchanged": [s["publish_unchanged"] for s in summaries]}))
    assert auc_merged >= auc_single - 0.02, (auc_merged, auc_single)


def test_shared_weights_merge_per_slot_weighted_by_what_each_learner_learned_there():
    from online.assembly import merge_linear
    from online.river_models import make_model

    rng = np.random.default_rng(3)
    first, second = make_model("ftrl", 4), make_model("ftrl", 4)
    for model, own, n in ((first, 1, 300), (second, 2, 100)):  # slot 0 is shared (a bias), 1 and 2 are each one's
        indices = np.tile(np.array([[0, own]], dtype=np.int32), (n, 1))
        model.learn_many(indices, np.ones(indices.shape, dtype=np.float32), rng.random(n) < (0.8 if own == 1 else 0.3))
    merged = merge_linear([first, second], 4).weights
    assert merged[1] == np.float32(first.w[1]) and merged[2] == np.float32(second.w[2])  # one learner's: kept
    shared = (first.n[0] * first.w[0] + second.n[0] * second.w[0]) / (first.n[0] + second.n[0])
    assert merged[0] == pytest.approx(shared, rel=1e-6) and min(first.w[0], second.w[0]) < merged[0] < max(first.w[0], second.w[0])
    assert not merged[3:].any()  # never learned by anyone


def partition_records(partitions: int, seed: int, events: int = 3000) -> list:
    """Generated events as consumer records, each on its merchant's partition (offsets per partition)."""
    from online.slices import slot_of
    from streams.consumer import Record

    offsets: Counter = Counter()
    out = []
    for event in generate(GeneratorConfig(merchants=6, events=events, seed=seed, items_per_merchant=(20, 60))):
        p = slot_of(event.merchant_id, partitions)
        out.append(Record(event, "events", p, offsets[p], 0, event.merchant_id.encode()))
        offsets[p] += 1
    return out


def _in_process(settings: Settings, store: Path, worker_id: str) -> OnlineWorker:
    config = WorkerConfig(model="ftrl", group="g", store=store, worker_id=worker_id, block=64, flush_after_s=3600,
                          publish_every_s=None, publish_at_end=False, rank_every=0)
    worker = OnlineWorker(settings, config)
    worker.state.partitions = 4
    return worker


def test_a_slot_is_adopted_from_the_newest_checkpoint_and_one_worker_assembles_to_its_own_state(settings, tmp_path):
    store, records = tmp_path / "store", partition_records(4, seed=8)
    first = _in_process(settings, store, "a")
    first.accept(records)
    first.flush_stale(force=True)
    first.checkpoint(commit=False)

    # one worker: the assembled version is its own state (the bundle it published before stores existed)
    alone, assembled = snapshot(first.state, first.config, {})["bundle"], assembled_snapshot(store, first.config, {})
    np.testing.assert_array_equal(assembled["bundle"].model.weights, alone.model.weights)
    assert assembled["bundle"].context.state() == alone.context.state()
    assert assembled["lineage"]["shared_weights"] == "single" and assembled["step"] == first.state.events

    # a second worker given slot 1 takes exactly that slot's merchants, offsets and count from the first
    second = _in_process(settings, store, "b")
    assert second.adopt_newest({1}) == [1] and second.adopt_newest({1}) == []  # already the newest copy
    theirs = {m: n for m, n in first.state.merchant_events.items() if slot_of(m, 4) == 1}
    assert theirs and set(theirs) < set(first.state.merchant_events) and second.state.merchant_events == theirs
    assert second.state.offsets == {key: o for key, o in first.state.offsets.items() if key[1] == 1}
    assert second.state.slots == {1: first.state.slots[1]}
    assert set(second.state.context.merchants) == set(theirs)
    assert {m: s for m, s in second.state.recommender.state.shops.items()} == {
        m: s for m, s in first.state.recommender.state.shops.items() if m in theirs}
