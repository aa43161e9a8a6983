"""The learners' shared checkpoint store on S3 (moto's server on a loopback port) against a directory.

Only moto is started (``registry.stack.s3_server_command``, the production stack's S3 stand-in), no
broker: workers learn in-process from records built here, as in ``tests/test_scaleout.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from drift.monitor import DriftMonitor
from fedstream.host import free_port
from fedstream.settings import Settings
from online.publishing import assembled_snapshot
from online.slices import newest, read_store, slot_of
from online.state import CHECKPOINT_VERSION, WorkerConfig
from online.store import DirectoryStore, S3Store, open_store
from online.worker import OnlineWorker
from registry.stack import create_bucket, s3_server_command
from tests.test_drift_native import _held
from tests.test_scaleout import partition_records

BUCKET, KEY, SECRET = "learners", "fedstream", "fedstream-minio-secret"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server, bucket ``learners`` created; stopped (its process group) at the end."""
    port, log_path = free_port(), tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("ab") as log_file:
        server = subprocess.Popen(s3_server_command(port), stdin=subprocess.DEVNULL, stdout=log_file,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not create_bucket(endpoint, BUCKET, KEY, SECRET):
            assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.2)
        yield endpoint
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def s3_settings(settings: Settings, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    online = settings.online.model_copy(update={"store_endpoint_url": s3_endpoint})
    return settings.model_copy(update={"online": online})


def _worker(settings: Settings, store: str | Path, worker_id: str) -> OnlineWorker:
    config = WorkerConfig(model="ftrl", group="g", store=store, worker_id=worker_id, block=64, flush_after_s=3600,
                          publish_every_s=None, publish_at_end=False, rank_every=0)
    worker = OnlineWorker(settings, config)
    worker.state.partitions = 4
    return worker


def _learn(worker: OnlineWorker, records: list) -> None:
    worker.accept(records)
    worker.flush_stale(force=True)
    worker.checkpoint(commit=False)


def _two_workers(settings: Settings, store: str | Path) -> None:
    """Worker a learns slots 0-1, worker b slots 2-3 of one stream; both checkpoint into ``store``."""
    records = partition_records(4, seed=21, events=2000)
    _learn(_worker(settings, store, "a"), [r for r in records if r.partition < 2])
    _learn(_worker(settings, store, "b"), [r for r in records if r.partition >= 2])


def test_s3_store_lists_reads_and_replaces_whole_objects_under_its_prefix(s3_settings):
    prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    store = open_store(f"{prefix}/learners", s3_settings)
    assert isinstance(store, S3Store) and store.names() == [] and store.read("a.ckpt") is None
    store.write("a.ckpt", b"one")
    store.write("a.ckpt", b"two")
    store.write("b.ckpt", b"three")
    store.write("notes.txt", b"not a checkpoint")
    open_store(f"{prefix}/learners/old", s3_settings).write("c.ckpt", b"deeper")  # another prefix
    open_store(f"{prefix}/learners-2", s3_settings).write("d.ckpt", b"a sibling")
    assert store.names() == ["a.ckpt", "b.ckpt"] and store.read("a.ckpt") == b"two"
    assert store.where("a.ckpt") == f"{prefix}/learners/a.ckpt"

    with pytest.raises(OSError, match=r"^checkpoint store s3://no-such-bucket/x/a.ckpt: .*NoSuchBucket"):
        open_store("s3://no-such-bucket/x", s3_settings).write("a.ckpt", b"")
    with pytest.raises(ValueError, match="a directory or s3://bucket/prefix"):
        open_store("gs://bucket/x", s3_settings)


def test_checkpoints_on_s3_adopt_and_assemble_as_from_a_directory(s3_settings, tmp_path):
    directory, s3 = tmp_path / "store", f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/learners"
    _two_workers(s3_settings, directory)
    _two_workers(s3_settings, s3)
    on_disk, on_s3 = DirectoryStore(directory), open_store(s3, s3_settings)
    assert on_s3.names() == on_disk.names() == ["a.ckpt", "b.ckpt"]
    from_disk, from_s3 = read_store(on_disk, CHECKPOINT_VERSION), read_store(on_s3, CHECKPOINT_VERSION)
    assert newest(from_s3) == newest(from_disk) == {0: "a.ckpt", 1: "a.ckpt", 2: "b.ckpt", 3: "b.ckpt"}

    # a third worker given slots 1 and 2 adopts the same state from S3 as from the directory
    mine, theirs = _worker(s3_settings, directory, "c"), _worker(s3_settings, s3, "c")
    assert mine.adopt_newest({1, 2}) == theirs.adopt_newest({1, 2}) == [1, 2]
    assert theirs.state.slots == mine.state.slots and theirs.state.offsets == mine.state.offsets
    assert theirs.state.merchant_events == mine.state.merchant_events and theirs.state.merchant_events
    assert theirs.state.context.state() == mine.state.context.state()
    assert theirs.state.recommender.state.shops == mine.state.recommender.state.shops
    assert theirs.checkpoint_path == f"{s3}/c.ckpt"

    # one version assembled from S3 equals the one assembled from the directory
    config = WorkerConfig(model="ftrl", group="g")
    disk_version, s3_version = assembled_snapshot(on_disk, config, {}), assembled_snapshot(on_s3, config, {})
    np.testing.assert_array_equal(s3_version["bundle"].model.weights, disk_version["bundle"].model.weights)
    assert s3_version["bundle"].context.state() == disk_version["bundle"].context.state()
    assert s3_version["lineage"] == disk_version["lineage"] and s3_version["step"] == disk_version["step"]
    assert s3_version["lineage"]["assembled_from"].keys() == {"a.ckpt", "b.ckpt"}

    # a worker restarted on the S3 store resumes from its own checkpoint there
    again = _worker(s3_settings, s3, "a")
    assert again.state.slots == read_store(on_s3, CHECKPOINT_VERSION)["a.ckpt"]["slots"] and again.state.events > 0


@pytest.mark.parametrize("kind", ["directory", "s3"])
def test_a_stale_owner_writing_after_its_slot_moved_is_fenced_off(kind, s3_settings, tmp_path):
    from kafka.structs import TopicPartition

    from online.assembly import assemble

    store = tmp_path / "store" if kind == "directory" else f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/learners"
    records = partition_records(4, seed=33, events=2000)
    slot1 = [r for r in records if r.partition == 1]
    half = len(slot1) // 2
    zombie, successor = _worker(s3_settings, store, "a"), _worker(s3_settings, store, "b")
    zombie._assigned({TopicPartition("events", p) for p in range(4)})
    _learn(zombie, [r for r in records if r.partition != 1] + slot1[:half])

    # slot 1 moves to b while a is stalled past the session timeout: b adopts a's copy and learns a little
    assert successor._assigned({TopicPartition("events", 1)}) == {TopicPartition("events", 1): slot1[half - 1].offset + 1}
    claimed = read_store(open_store(store, s3_settings), CHECKPOINT_VERSION)["b.ckpt"]  # written at assignment
    assert claimed["epochs"] == {1: 2} and claimed["slots"] == {1: half}
    _learn(successor, slot1[half:half + 64])
    # a wakes up, still believing it owns slot 1: it learns the rest of it and writes its checkpoint last
    _learn(zombie, slot1[half:])
    peers = read_store(open_store(store, s3_settings), CHECKPOINT_VERSION)
    assert peers["a.ckpt"]["slots"][1] == len(slot1) > peers["b.ckpt"]["slots"][1] == half + 64

    # its copy of slot 1, with more events, is ignored: slot 1 is b's, the other slots a's
    assert newest(peers) == {0: "a.ckpt", 1: "b.ckpt", 2: "a.ckpt", 3: "a.ckpt"}
    parts = assemble(peers)
    slot1_merchants = {m: n for m, n in successor.state.merchant_events.items() if slot_of(m, 4) == 1}
    assert {m: n for m, n in parts["merchant_events"].items() if slot_of(m, 4) == 1} == slot1_merchants
    assert {key: o for key, o in parts["offsets"].items() if key[1] == 1} == {("events", 1): slot1[half + 63].offset + 1}

    # the next owner of slot 1 adopts b's copy, not the zombie's; so does the zombie once it rejoins
    third = _worker(s3_settings, store, "c")
    assert third.adopt_newest({1}) == [1] and third.state.slots == {1: half + 64}
    zombie._revoked(set())
    zombie._assigned({TopicPartition("events", p) for p in range(4)})
    assert zombie.state.slots[1] == half + 64 and zombie.state.offsets[("events", 1)] == slot1[half + 63].offset + 1


def test_compose_learners_use_an_s3_store_in_the_bucket_minio_init_creates(settings, monkeypatch):
    """deploy/docker-compose.yml: the learners' --store is an S3 prefix in a bucket minio-init creates, on
    the endpoint and with the credentials every fedstream service gets (the MLflow artifact store's)."""
    import re

    import yaml

    def default(text: str) -> str:  # ${VAR:-default} -> default: the value compose uses without a .env
        return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(text))

    compose = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "docker-compose.yml").read_text())
    learner, init, minio = (compose["services"][name] for name in ("learner", "minio-init", "minio"))
    command = [default(arg) for arg in learner["command"]]
    spec = command[command.index("--store") + 1]
    bucket = default(init["environment"]["LEARNER_BUCKET"])
    assert spec == f"s3://{bucket}/learners" and any("$$LEARNER_BUCKET" in line for line in init["command"][0].splitlines()
                                                   if line.strip().startswith("mc mb"))
    assert not any(str(volume).startswith("learner-store") for volume in learner.get("volumes", []))
    env = {key: default(value) for key, value in compose["x-fedstream"]["environment"].items()}
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert [env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]] == [
        default(minio["environment"]["MINIO_ROOT_USER"]), default(minio["environment"]["MINIO_ROOT_PASSWORD"])]

    for name, value in env.items():  # what the learner container sees
        if name.startswith(("MLFLOW_S3", "AWS_")):
            monkeypatch.setenv(name, value)
    store = open_store(spec, settings)
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == (bucket, "learners")
    assert store.client.meta.endpoint_url == "http://minio:9000"


def _watching(settings: Settings, store: str | Path, worker_id: str) -> OnlineWorker:
    """A worker of a frozen model (River's SGD at learning rate 0: p = 0.5 for every click) with a drift
    monitor: its predictions do not depend on what else it learned, so a merchant's error stream is the
    same at any owner and one worker's detectors are the reference for the moved ones."""
    config = WorkerConfig(model="river-sgd", params={"learning_rate": 0.0}, group="g", store=store,
                          worker_id=worker_id, block=64, flush_after_s=3600, publish_every_s=None,
                          publish_at_end=False, rank_every=0)

    def monitor(snapshot: bytes | None) -> DriftMonitor:
        return DriftMonitor(settings) if snapshot is None else DriftMonitor.restore(settings, snapshot)

    worker = OnlineWorker(settings, config, monitors={"drift": monitor})
    worker.state.partitions = 4
    return worker


def _sensitive(settings: Settings) -> Settings:
    """Error detectors that fire often (zero_one error of p = 0.5 is 1 - y), with open chunks and cool-downs."""
    drift = settings.drift.model_copy(update={
        "error_metric": "zero_one", "warmup_events": 20, "error_chunk": 3, "ph_threshold": 4.0, "ph_delta": 0.0,
        "ph_min_instances": 10, "cooldown_events": 40, "adwin_delta": 0.5, "adwin_clock": 4,
        "disabled": ("label.ctr",)})
    return settings.model_copy(update={"drift": drift})


def _events(monitor: DriftMonitor, merchants: set[str], since: dict[str, int] | None = None) -> list:
    """The monitor's drift events of ``merchants`` (at or after ``since[m]`` predictions), wall clock left out."""
    return [msgspec.structs.replace(e, detected_at=0.0) for e in monitor.events
            if e.merchant_id in merchants and e.event_index >= (since or {}).get(e.merchant_id, 0)]


def test_drift_detectors_move_with_their_slot_as_if_one_worker_learned_the_stream(settings, tmp_path):
    settings, store = _sensitive(settings), tmp_path / "store"
    records = partition_records(4, seed=21, events=4000)
    moved = [r for r in records if r.partition == 0]
    quarter, half, three_quarters = len(moved) // 4, len(moved) // 2, 3 * len(moved) // 4
    alone = _watching(settings, tmp_path / "alone", "alone")
    _learn(alone, records)
    reference = alone.state.monitors["drift"]

    # b owns slot 2 and is slot 0's first owner; slot 0 moves to a, which learns it on, checkpoints, learns
    # a quarter more and dies; slot 0 moves back to b, whose own (older) detectors of it must not survive
    b = _watching(settings, store, "b")
    _learn(b, moved[:quarter] + [r for r in records if r.partition == 2])
    a = _watching(settings, store, "a")
    assert a.adopt_newest({0}) == [0]
    _learn(a, [r for r in records if r.partition in (1, 3)] + moved[quarter:half])
    at_checkpoint = dict(a.state.monitors["drift"]._predictions)
    a.accept(moved[half:three_quarters])
    a.flush_stale(force=True)  # learned and detected after its last checkpoint: lost with it
    assert b.adopt_newest({0}) == [0]
    mine, theirs = b.state.monitors["drift"], a.state.monitors["drift"]
    slot0 = {m for m in reference.detectors if slot_of(m, 4) == 0}
    assert slot0 == {"m03", "m05"} and {m: mine._predictions[m] for m in slot0} == {m: at_checkpoint[m] for m in slot0}
    adopted_at = len(mine.events)
    _learn(b, moved[half:])

    # every merchant of b's slots: the detectors of the one worker that learned the whole stream
    for merchant in slot0 | {m for m in reference.detectors if slot_of(m, 4) == 2}:
        assert mine._predictions[merchant] == reference._predictions[merchant]
        for name, detector in reference.detectors[merchant].items():
            assert _held(mine.detectors[merchant][name]) == _held(detector), (merchant, name)
    assert set(mine.detectors) == slot0 | {"m00", "m04"}  # a's other merchants did not come along
    # the same detections after the move; those a made after its checkpoint are made again (at least once)
    after = _events(reference, slot0, since=at_checkpoint)
    assert [msgspec.structs.replace(e, detected_at=0.0) for e in mine.events[adopted_at:]] == after
    lost = _events(theirs, slot0, since=at_checkpoint)
    assert lost and after[:len(lost)] == lost
    assert _events(reference, slot0) != _events(reference, slot0, since=at_checkpoint) != []  # before and after


@pytest.mark.parametrize("peer_monitor", ["none", "former code"])
def test_drift_detectors_of_a_slot_adopted_from_an_older_checkpoint(peer_monitor, settings, tmp_path):
    """A peer checkpoint without monitors (written before they were checkpointed, or with --no-drift): the
    slot's merchants start from scratch at their new owner. One holding the snapshot of the former monitor
    code (``tests/data/drift_monitor_before_fastpath.pkl``: merchants a and b on slot 0, c on slot 2): the
    slot's merchants are exactly its a and b. The new owner's other merchants keep theirs either way."""
    import pickle

    settings, store = _sensitive(settings), tmp_path / "store"
    records = partition_records(4, seed=21, events=2000)
    a = _watching(settings, store, "a")
    _learn(a, [r for r in records if r.partition == 0])
    saved, former = pickle.loads(DirectoryStore(store).read("a.ckpt")), None
    if peer_monitor == "none":
        del saved["monitors"]
    else:
        former = (Path(__file__).parent / "data" / "drift_monitor_before_fastpath.pkl").read_bytes()
        saved["monitors"] = {"drift": former}
    DirectoryStore(store).write("a.ckpt", pickle.dumps(saved))
    b = _watching(settings, store, "b")
    _learn(b, [r for r in records if r.partition in (0, 2)])
    kept = {m: {name: _held(d) for name, d in detectors.items()}
            for m, detectors in b.state.monitors["drift"].detectors.items() if slot_of(m, 4) == 2}
    b.state.slots[0] = 0  # b's own copy of slot 0 is older than a's
    assert b.adopt_newest({0}) == [0]
    monitor = b.state.monitors["drift"]
    peer = DriftMonitor.restore(settings, former) if former is not None else DriftMonitor(settings)
    taken = {m: d for m, d in peer.detectors.items() if slot_of(m, 4) == 0}
    assert set(monitor.detectors) == set(kept) | set(taken) and set(kept) == {"m00", "m04"}
    assert set(taken) == ({"a", "b"} if former else set())
    assert {m: n for m, n in monitor._predictions.items() if slot_of(m, 4) == 0} == {m: peer._predictions[m] for m in taken}
    for merchant, detectors in monitor.detectors.items():
        reference = kept.get(merchant) or {name: _held(d) for name, d in taken[merchant].items()}
        assert {name: _held(d) for name, d in detectors.items()} == reference, merchant
