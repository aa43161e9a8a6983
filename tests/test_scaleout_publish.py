"""N learners of one group register one version per publication interval, none when nothing changed.

No broker: workers learn in-process from records built here (as in ``tests/test_scaleout_store.py``), are
given their partitions through the worker's own rebalance hooks, checkpoint into a directory store, and
their publishers register into the real MLflow sqlite store of the ``settings`` fixture (a temp dir).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka.structs import TopicPartition

from fedstream.settings import Settings
from online.publishing import assembled_snapshot, generation
from online.slices import read_store
from online.state import CHECKPOINT_VERSION, WorkerConfig
from online.store import DirectoryStore
from online.worker import OnlineWorker
from registry.models import latest_version, list_versions, version_lineage
from tests.test_scaleout import partition_records

SLOTS = {"a": {0, 1}, "b": {2}, "c": {3}}


def _member(settings: Settings, store: Path | None, worker_id: str, slots: set[int],
            checkpoint: Path | None = None, model: str = "ftrl", group: str = "g") -> OnlineWorker:
    """A group member given ``slots`` by the group (its rebalance hook), publishing every second."""
    config = WorkerConfig(model=model, group=group, store=store, checkpoint_path=checkpoint, worker_id=worker_id,
                          block=64, flush_after_s=3600, publish_every_s=1.0, publish_at_end=True, rank_every=0)
    worker = OnlineWorker(settings, config)
    worker.state.partitions = 4
    worker._assigned({TopicPartition("events", p) for p in slots})
    return worker


def _learn(worker: OnlineWorker, records: list) -> None:
    worker.accept(records)
    worker.flush_stale(force=True)
    worker.checkpoint(commit=False)


def _of(records: list, slots: set[int], part: slice = slice(None)) -> list:
    """The records of ``slots``, each slot's ``part`` of them."""
    return [r for slot in sorted(slots) for r in [r for r in records if r.partition == slot][part]]


def _interval(workers: list[OnlineWorker]) -> None:
    """Every member's schedule falls due at once; the publications in flight are waited for."""
    for worker in workers:
        worker.publisher.last_publish -= 10
        worker._maybe_publish()
    for worker in workers:
        worker.publisher.join(timeout=120)
        assert not worker.publish_errors, worker.publish_errors


def _versions(settings: Settings) -> list[str]:
    return [row["version"] for row in list_versions(settings, settings.serving.model_name)][::-1]


def _store_generation(store: Path, config: WorkerConfig) -> dict:
    return generation(read_store(DirectoryStore(store), CHECKPOINT_VERSION), config)


def test_one_registration_per_interval_for_the_group_none_when_nothing_changed(settings, tmp_path):
    store, records = tmp_path / "store", partition_records(4, seed=5, events=1500)
    a, b, c = workers = [_member(settings, store, name, slots) for name, slots in SLOTS.items()]
    for worker, slots in zip(workers, SLOTS.values()):
        _learn(worker, _of(records, slots, slice(None, 100)))
    assert [w.publisher.scheduled for w in workers] == [True, False, False]  # a holds slot 0

    _interval(workers)
    assert (a.published, b.published, c.published) == (["1"], [], []) and _versions(settings) == ["1"]
    first = version_lineage(latest_version(settings, settings.serving.model_name))
    assert first["generation"] == _store_generation(store, a.config) and sorted(first["assembled_from"]) == ["a.ckpt", "b.ckpt", "c.ckpt"]
    assert first["generation"]["slots"] == {"0": 100, "1": 100, "2": 100, "3": 100}

    # b learns more, the others nothing: one registration, by a, holding b's new events
    _learn(b, _of(records, {2}, slice(100, None)))
    _interval(workers)
    assert _versions(settings) == ["1", "2"] and a.published == ["1", "2"] and not b.published + c.published
    second = version_lineage(latest_version(settings, settings.serving.model_name))
    assert second["generation"]["slots"]["2"] == len(_of(records, {2})) and second["generation"] == _store_generation(store, a.config)

    # nothing changed: the due publication registers nothing
    _interval(workers)
    assert _versions(settings) == ["1", "2"] and a.publisher.unchanged == ["2"]

    # a leaves: b is given its slots (adopting a's copies: new epochs, the same events) and publishes for
    # the group from now on; the version it assembles is the one registered, so it registers nothing
    a._revoked({TopicPartition("events", p) for p in SLOTS["a"]})
    b._revoked({TopicPartition("events", 2)})
    b._assigned({TopicPartition("events", p) for p in (0, 1, 2)})
    assert [w.publisher.scheduled for w in workers] == [False, True, False]
    assert b.state.epochs == {0: 2, 1: 2, 2: 2}
    _interval([b, c])
    assert _versions(settings) == ["1", "2"] and b.publisher.unchanged == ["2"] and not b.published
    _learn(b, _of(records, {0}, slice(100, None)))
    _interval([b, c])
    assert _versions(settings) == ["1", "2", "3"] and b.published == ["3"] and not c.published


def _stop(worker: OnlineWorker) -> None:
    """The end of a worker's run: its final checkpoint, then its publication at the end."""
    worker.checkpoint(commit=False)
    worker._maybe_publish(force=True)
    assert not worker.publish_errors, worker.publish_errors


@pytest.mark.parametrize("stops", ["together", "staggered"])
def test_the_final_state_is_registered_once_and_complete(stops, settings, tmp_path):
    """Together: every member learned all its records before any stops; the first to stop registers the
    final state, the others find it registered. Staggered: a stops first (its version: the state then),
    c next (nothing new), b learns on and stops last: the final state is b's, registered once."""
    store, records = tmp_path / "store", partition_records(4, seed=6, events=1500)
    a, b, c = workers = [_member(settings, store, name, slots) for name, slots in SLOTS.items()]
    held_back = _of(records, {2}, slice(-150, None)) if stops == "staggered" else []
    for worker, slots in zip(workers, SLOTS.values()):
        _learn(worker, [r for r in _of(records, slots) if r not in held_back])
    for worker in (a, c):
        _stop(worker)
    _learn(b, held_back)
    _stop(b)

    expected = (["1"], [], []) if stops == "together" else (["1"], ["2"], [])
    assert (a.published, b.published, c.published) == expected
    assert (a.publisher.unchanged, b.publisher.unchanged, c.publisher.unchanged) == (
        ([], ["1"], ["1"]) if stops == "together" else ([], [], ["1"]))
    final = latest_version(settings, settings.serving.model_name)
    assert final.version == int(expected[0][0] if stops == "together" else expected[1][0])
    lineage, complete = version_lineage(final), assembled_snapshot(store, b.config, {})["lineage"]
    assert sum(lineage["generation"]["slots"].values()) == len(records)
    assert {k: v for k, v in lineage.items() if k != "worker_id"} == {k: v for k, v in complete.items() if k != "worker_id"}


def test_two_workers_stopping_together_register_their_equal_assemblies_once(settings, tmp_path):
    """The race: both read the store and find no version holding it, both assemble; the registry is asked
    again just before a version is created, so the later one registers nothing."""
    store, records = tmp_path / "store", partition_records(4, seed=8, events=600)
    a, b = [_member(settings, store, name, slots) for name, slots in (("a", {0, 1}), ("b", {2, 3}))]
    for worker, slots in ((a, {0, 1}), (b, {2, 3})):
        _learn(worker, _of(records, slots))
    taken = [worker.publisher._take(worker.state, worker.metrics())() for worker in (a, b)]
    assert all("bundle" in t for t in taken) and taken[0]["lineage"]["generation"] == taken[1]["lineage"]["generation"]
    assert [worker.publisher.register(t) for worker, t in zip((b, a), taken[::-1])] == ["1", "1"]
    assert (b.published, a.publisher.unchanged, _versions(settings)) == (["1"], ["1"], ["1"])


def test_two_groups_of_other_learners_on_the_same_stream_both_register(settings, tmp_path):
    """An FTRL group and an Adam group learning the same events under one model name (the demo's two
    learners) hold checkpoints with the same names and counts: each group's version is its own, so
    neither is skipped as the other's."""
    records = partition_records(4, seed=9, events=600)
    ftrl, adam = [_member(settings, tmp_path / model, "w", {0, 1, 2, 3}, model=model, group=f"g-{model}")
                  for model in ("ftrl", "adam")]
    for worker in (ftrl, adam):
        _learn(worker, records)
        _interval([worker])
    assert (ftrl.published, adam.published, adam.publisher.unchanged) == (["1"], ["2"], [])


def test_a_worker_without_a_store_publishes_as_before(settings, tmp_path):
    """An explicit checkpoint file alone: a worker on its own, scheduled whatever its partitions; every due
    publication registers a version of its live state, changed or not, with no generation."""
    records = partition_records(4, seed=7, events=600)
    worker = _member(settings, None, "alone", {1, 2}, checkpoint=tmp_path / "alone.ckpt")
    assert worker.store is None and worker.publisher.scheduled
    _learn(worker, _of(records, {1, 2}))
    _interval([worker])
    worker._revoked({TopicPartition("events", 0)})
    _interval([worker])
    assert worker.published == ["1", "2"] and not worker.publisher.unchanged
    lineage = version_lineage(latest_version(settings, settings.serving.model_name))
    assert "generation" not in lineage and "assembled_from" not in lineage
    assert lineage["events_seen"] == worker.state.events
