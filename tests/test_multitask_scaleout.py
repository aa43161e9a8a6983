"""The multi-task learner under scale-out: held clicks move with their partition slot, and one version merges
every worker's multi-task weights (no broker: workers learn in-process, as in ``tests/test_scaleout_store.py``)."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest

from fedstream.metrics import roc_auc
from fedstream.settings import Settings
from online.attribution import AttributionJoiner, attributed_labels
from online.multitask import MultiTaskScorer, MultiTaskState
from online.publishing import assembled_snapshot, snapshot
from online.slices import slot_of
from online.store import DirectoryStore
from registry.bundle import ModelBundle
from streams.consumer import Record
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click, Order
from tests.test_scaleout_store import _learn, _worker

WINDOW, LATENESS, JITTER = 300.0, 60.0, 30.0


def _slot(merchant: str) -> int:
    return int(merchant[1:]) % 2


def _stream(seed: int, events: int = 4000) -> tuple[list[tuple], np.ndarray]:
    """("click", merchant, user, item, time, name) and ("order", merchant, user, items, time) in arrival order,
    and their arrival times: 6 merchants on 2 slots, 4 users and 4 items each (many clicks per key, orders of
    several items, clicks after an order of their key), whole seconds (ties), event times up to ``JITTER``
    before their arrival (within the lateness: the watermark never passes an event not yet read)."""
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.integers(0, events // 2, events)).astype(float)
    out = []
    for k, at in enumerate(arrival):
        merchant, user, when = f"m{rng.integers(6)}", f"u{rng.integers(4)}", float(at - np.floor(rng.uniform(0, JITTER)))
        if rng.random() < 0.6:
            out.append(("click", merchant, user, f"i{rng.integers(4)}", when, f"c{k}"))
        else:
            items = [f"i{j}" for j in rng.choice(4, size=rng.integers(1, 3), replace=False)]
            out.append(("order", merchant, user, items, when))
    return out, arrival


def _joiner(release: str) -> AttributionJoiner:
    return AttributionJoiner(WINDOW, {"m1": 90.0}, LATENESS, max_pending=100_000, release=release)


def _feed(joiner: AttributionJoiner, events: list[tuple]) -> list[list[tuple]]:
    """Every event's resolved clicks as (name, converted, click time, delay or None)."""
    out = []
    for event in events:
        if event[0] == "click":
            resolved = joiner.click(*event[1:])
        else:
            resolved = joiner.order(*event[1:])
        out.append([(r.payload, r.converted, r.click_time, r.delay_s if r.converted else None) for r in resolved])
    return out


def _labels(emitted: list[list[tuple]], merchant_of: dict[str, str], slot: int | None = None) -> dict[str, tuple]:
    found: dict[str, tuple] = {}
    for resolved in emitted:
        for name, *label in resolved:
            if slot is None or _slot(merchant_of[name]) == slot:
                assert name not in found, f"{name} resolved twice"
                found[name] = tuple(label)
    return found


def _consistent(joiner: AttributionJoiner) -> None:
    """The joiner's global structures agree: one heap entry per held click, at its deadline (more, of clicks
    no longer held, are skipped when popped), the by-key index holds exactly the held clicks not yet
    converted, in click order, and every number is below the next one."""
    entries = {seq: deadline for deadline, seq in joiner._deadlines}
    assert len(entries) == len(joiner._deadlines) and all(entries[s] == held[2] for s, held in joiner._held.items())
    indexed = [seq for seqs in joiner._by_key.values() for seq in seqs]
    assert sorted(indexed) == sorted(seq for seq, held in joiner._held.items() if held[4] is None)
    assert all(seqs == sorted(seqs) and all(joiner._held[s][0] == key for s in seqs) for key, seqs in joiner._by_key.items())
    assert all(seq < joiner._seq for seq in joiner._held)
    assert not joiner._held.keys() & joiner._parked.keys() and all(seq < joiner._seq for seq in joiner._parked)


@pytest.mark.parametrize("release", ["window", "order"])
@pytest.mark.parametrize("parked", ["before", "after"])
def test_held_clicks_move_with_their_slot_and_are_attributed_as_one_joiner_would(release, parked):
    """Slot 0's first owner is b; it moves to a, which adopts b's copy ``parked`` before or after b parks its
    held clicks of the slot (b's stale copy: its slot-1 traffic resolves none of them), a checkpoints, learns on
    and dies; b adopts slot 0 again from a's checkpoint and learns slot 0 again from there while its slot-1
    position is ahead. Every click gets the label one joiner fed the whole stream gives it, from exactly one
    owner, and after the move b emits what that joiner emits, event by event. Exact because the event time b's
    slot 1 is ahead of the re-read part of slot 0 stays within the lateness minus the jitter: then the watermark
    never passes an order not yet read (the README says what happens beyond)."""
    events, arrival = _stream(seed=11)
    merchant_of = {e[5]: e[1] for e in events if e[0] == "click"}
    reference = _joiner(release)
    one = _feed(reference, events)
    one.append([(r.payload, r.converted, r.click_time, r.delay_s if r.converted else None)
                for r in reference.advance(1e12)])
    truth = _labels(one, merchant_of)
    assert len(truth) == len(merchant_of) and 200 < sum(label[0] for label in truth.values()) < len(truth) - 200

    first, second = len(events) // 3, len(events) // 2  # b -> a at first; a's checkpoint at second
    # b's slot 1 is at third when slot 0 comes back: the watermark (<= arrival[third] - LATENESS) stays at or
    # below every re-read event's time (>= arrival[second] - JITTER)
    third = int(np.searchsorted(arrival, arrival[second] + LATENESS - JITTER, side="right")) - 1
    assert third - second > 20
    slot0 = [k for k in range(len(events)) if _slot(events[k][1]) == 0]
    b, a = _joiner(release), _joiner(release)
    valid = _feed(b, events[:first])
    if parked == "before":
        b.own_merchants(lambda m: _slot(m) == 1)
    a.adopt_merchants(pickle.loads(pickle.dumps(b)), lambda m: _slot(m) == 0)
    b.own_merchants(lambda m: _slot(m) == 1)  # b's assignment callback: slot 0 is given up (again: no change)
    _consistent(a)
    _consistent(b)
    assert b.stats()["parked"] == sum(_slot(key[0]) == 0 for key, *_ in a._held.values()) > 20
    assert a.latest == b.latest  # the new owner's watermark: the later of the two (a had seen nothing)
    valid += _feed(a, [events[k] for k in slot0 if first <= k < second])
    checkpoint = pickle.dumps(a)
    _feed(a, [events[k] for k in slot0 if second <= k < third])  # lost with a
    stale = _feed(b, [e for e in events[first:third] if _slot(e[1]) == 1])
    assert all(_slot(merchant_of[r[0]]) == 1 for resolved in stale for r in resolved)  # none of b's stale copy
    valid += stale

    b.adopt_merchants(pickle.loads(checkpoint), lambda m: _slot(m) == 0)  # a's copy replaces the parked one
    _consistent(b)
    assert b.stats()["parked"] == 0
    assert b.watermark == max(e[4] for e in events[:third] if _slot(e[1]) == 1) - LATENESS
    valid += _feed(b, [events[k] for k in slot0 if second <= k < third])  # slot 0 again from a's checkpoint
    after = _feed(b, events[third:])
    _consistent(b)
    after.append([(r.payload, r.converted, r.click_time, r.delay_s if r.converted else None) for r in b.advance(1e12)])
    assert _labels(valid + after, merchant_of) == truth
    assert [sorted(r) for r in after] == [sorted(r) for r in one[third:]]  # the same clicks at the same events
    assert b.pending == 0 and not b._by_key


def test_adopting_from_a_peer_without_held_clicks_drops_the_slot_and_keeps_the_rest():
    events, _ = _stream(seed=5, events=1500)
    joiner = _joiner("window")
    _feed(joiner, events)
    before = {seq: held for seq, held in joiner._held.items() if _slot(held[0][0]) == 1}
    latest = joiner.latest
    assert before and len(before) < joiner.pending
    joiner.adopt_merchants(None, lambda m: _slot(m) == 0)  # the peer ran without the multi-task learner
    _consistent(joiner)
    assert joiner._held == before and joiner.latest == latest
    joiner.adopt_merchants(_joiner("window"), lambda m: _slot(m) == 1)  # a peer that held nothing yet
    assert joiner.pending == 0 and joiner.latest == latest
    assert joiner.advance(1e12) == [] and not joiner._deadlines  # the dropped clicks' heap entries: skipped


@pytest.mark.parametrize("release", ["window", "order"])
def test_clicks_parked_and_held_again_resolve_as_if_never_parked(release):
    """b gives slot 0 up at ``first``, learns slot 1 up to ``second`` and gets slot 0 back before any peer took
    it, so it resumes slot 0 at ``first`` with its own copy: slot 1's traffic resolves none of the parked
    clicks, they come back
    under their own numbers, every click gets the label one joiner fed the whole stream gives it, and once
    slot 0 caught up b holds and emits exactly, event by event and in order, what the never-parked joiner
    does (the watermark slot 1 moved stays within the lateness minus the jitter, as in the test above)."""
    events, arrival = _stream(seed=23)
    merchant_of = {e[5]: e[1] for e in events if e[0] == "click"}
    first = len(events) // 3
    second = int(np.searchsorted(arrival, arrival[first] + LATENESS - JITTER, side="right")) - 1
    assert second - first > 20
    slot1, slot0 = ([e for e in events[first:second] if _slot(e[1]) == slot] for slot in (1, 0))
    whole = _joiner(release)
    truth = _labels(_feed(whole, events) + [[(r.payload, r.converted, r.click_time, r.delay_s if r.converted else None)
                                              for r in whole.advance(1e12)]], merchant_of)
    reference, b = _joiner(release), _joiner(release)
    _feed(reference, events[:first] + slot1 + slot0)
    got = _feed(b, events[:first])
    b.own_merchants(lambda m: _slot(m) == 1)
    _consistent(b)
    assert b.stats()["parked"] > 20
    during = _feed(b, slot1)
    assert all(_slot(merchant_of[r[0]]) == 1 for resolved in during for r in resolved)
    b.own_merchants(lambda m: True)
    _consistent(b)
    assert b.stats()["parked"] == 0
    got += during + _feed(b, slot0)
    assert b._held == reference._held and b._by_key == reference._by_key and b.latest == reference.latest
    after, expected_after = _feed(b, events[second:]), _feed(reference, events[second:])
    assert after == expected_after
    final = [[(r.payload, r.converted, r.click_time, r.delay_s if r.converted else None) for r in b.advance(1e12)]]
    assert _labels(got + after + final, merchant_of) == truth


def test_a_joiner_pickled_before_parking_restores_and_is_adopted_from():
    events, _ = _stream(seed=7, events=1500)
    former = _joiner("window")
    _feed(former, events)
    del former.__dict__["_parked"]  # what the former code pickled
    restored = pickle.loads(pickle.dumps(former))
    assert restored.stats()["parked"] == 0 and restored._held == former._held
    mine = _joiner("window")
    mine.adopt_merchants(restored, lambda m: _slot(m) == 0)
    _consistent(mine)
    assert [held for _, held in sorted(mine._held.items())] == [
        held for _, held in sorted(former._held.items()) if _slot(held[0][0]) == 0]


# -- workers: checkpoints in a store, adoption, assembly -------------------------------------------------------


def _enabled(settings: Settings, window_s: float = 600.0) -> Settings:
    return settings.model_copy(update={"multitask": settings.multitask.model_copy(
        update={"enabled": True, "attribution_window_s": window_s})})


def _records(events: list) -> list:
    """Consumer records of ``events`` on their merchant's partition of 4 (offsets per partition)."""
    offsets: Counter = Counter()
    out = []
    for event in events:
        p = slot_of(event.merchant_id, 4)
        out.append(Record(event, "events", p, offsets[p], 0, event.merchant_id.encode()))
        offsets[p] += 1
    return out


def _held(state: MultiTaskState, slots: set[int]) -> list[tuple]:
    """The clicks ``state`` holds of merchants on ``slots``, in click order: key, time, deadline, order delay,
    feature slots and the logit predicted at the click."""
    return [(key, at, deadline, delay, row.tolist(), logit)
            for _, (key, at, deadline, (row, logit), delay) in sorted(state.joiner._held.items())
            if slot_of(key[0], 4) in slots]


def _stream_events(seed: int, events: int) -> list:
    return list(generate(GeneratorConfig(merchants=6, events=events, seed=seed, items_per_merchant=(20, 60),
                                         conversion_delay_s=60.0)))


def test_a_moved_slot_brings_its_held_clicks_and_an_older_peer_checkpoint_brings_none(settings, tmp_path):
    # the default window (a day): every merchant but the quietest (m05: two days without events at the end) holds
    # clicks at the end of the stream
    settings, store = _enabled(settings, 86_400.0), tmp_path / "store"
    records = _records(_stream_events(seed=21, events=3000))
    a, b = _worker(settings, store, "a"), _worker(settings, store, "b")
    _learn(a, [r for r in records if r.partition < 2])
    _learn(b, [r for r in records if r.partition >= 2])
    held_a, held_b = _held(a.state.multitask, {1}), _held(b.state.multitask, {2})
    assert held_a and held_b and _held(a.state.multitask, {0})

    c = _worker(settings, store, "c")
    _learn(c, [r for r in records if r.partition == 3][:500])  # c's own clicks of slot 3 stay
    own = _held(c.state.multitask, {3})
    assert own and c.adopt_newest({1, 2}) == [1, 2]
    mine = c.state.multitask
    assert _held(mine, {1}) == held_a and _held(mine, {2}) == held_b and _held(mine, {0}) == []
    assert _held(mine, {3}) == own and mine.joiner.latest == max(a.state.multitask.joiner.latest,
                                                                  b.state.multitask.joiner.latest)

    # a checkpoint written without the multi-task learner (or before it): the slot's held clicks are dropped
    saved = pickle.loads(DirectoryStore(store).read("a.ckpt"))
    del saved["multitask"]
    DirectoryStore(store).write("a.ckpt", pickle.dumps(saved))
    d = _worker(settings, store, "d")
    _learn(d, [r for r in records if r.partition in (1, 3)])
    d.state.slots[1] = 0  # d's own copy of slot 1 is older than a's
    kept = _held(d.state.multitask, {3})
    assert _held(d.state.multitask, {1}) and kept and d.adopt_newest({1}) == [1]
    assert _held(d.state.multitask, {1}) == [] and _held(d.state.multitask, {3}) == kept


def _scores(scorer: MultiTaskScorer, bundle: ModelBundle, clicks: list) -> tuple[np.ndarray, np.ndarray]:
    rows = np.array([bundle.featurizer.slots_for(c.merchant_id, c.user_id, c.item_id, c.timestamp, c.device,
                                                 c.page, c.position, bundle.context) for c in clicks])
    return scorer.predict_many(rows, np.ones(rows.shape))


def _auc_and_noise(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """ROC AUC and twice its standard error (Hanley & McNeil 1982) for these counts of positives and negatives."""
    auc, positives, negatives = roc_auc(y, p), int(y.sum()), int(len(y) - y.sum())
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return auc, 2 * float(np.sqrt(variance / (positives * negatives)))


def test_the_assembled_multitask_model_merges_every_worker_and_one_worker_is_served_as_its_own(settings, tmp_path):
    """Two workers (slots 0-1 and 2-3 of one stream) against one that learned it whole, on the last 15% of
    the stream (learned by no one): on each worker's merchants the merged model ranks clicks (and clicked
    impressions by their attributed order) within twice the AUC's standard error of the single worker's
    (the two models learned the same events; only what one worker learned on shared weights from the
    other's merchants differs, so no loss beyond the held-out set's noise is expected), and better than the
    model served before (the larger worker's) on the other worker's merchants."""
    settings = _enabled(settings)
    events = _stream_events(seed=8, events=30_000)
    cut = int(len(events) * 0.85)
    records, held_out = _records(events[:cut]), [e for e in events[cut:] if isinstance(e, Click)]
    alone = _worker(settings, tmp_path / "alone", "alone")
    _learn(alone, records)
    single = snapshot(alone.state, alone.config, {})
    assembled_alone = assembled_snapshot(tmp_path / "alone", alone.config, {})
    for name in ("click", "conversion"):  # one worker: exactly its own
        assert np.array_equal(getattr(assembled_alone["bundle"].multitask, name), getattr(single["bundle"].multitask, name))
    assert assembled_alone["bundle"].multitask.calibration == single["bundle"].multitask.calibration
    assert assembled_alone["lineage"]["multitask"] == single["lineage"]["multitask"] == "single"
    assert assembled_alone["lineage"]["multitask_merged"] == single["lineage"]["multitask_merged"] == 1

    a, b = _worker(settings, tmp_path / "store", "a"), _worker(settings, tmp_path / "store", "b")
    _learn(a, [r for r in records if r.partition < 2])
    _learn(b, [r for r in records if r.partition >= 2])
    merged = assembled_snapshot(tmp_path / "store", a.config, {})
    assert merged["lineage"]["multitask"] == "slot-activity-weighted" and merged["lineage"]["multitask_merged"] == 2
    calibrations = [w.state.multitask.calibrator for w in (a, b)]
    for k, value in enumerate(merged["bundle"].multitask.calibration):
        assert min(getattr(c, "ab"[k]) for c in calibrations) <= value <= max(getattr(c, "ab"[k]) for c in calibrations)
    larger = max((a, b), key=lambda w: w.state.events)
    before = MultiTaskScorer.from_state(larger.state.multitask)  # what assembly served before: the larger worker's
    orders = [(o.merchant_id, o.user_id, [line.item_id for line in o.items], o.timestamp)
              for o in events if isinstance(o, Order)]
    for worker in (a, b):
        mine = [c for c in held_out if slot_of(c.merchant_id, 4) in worker.state.slots]
        clicked = [c for c in mine if c.clicked]
        converted = np.array(attributed_labels([(c.merchant_id, c.user_id, c.item_id, c.timestamp) for c in clicked],
                                               orders, window_s=600.0))
        y_click = np.array([c.clicked for c in mine])
        assert y_click.sum() > 200 and converted.sum() > 80
        single_click, noise_click = _auc_and_noise(y_click, _scores(single["bundle"].multitask, single["bundle"], mine)[0])
        single_conversion, noise_conversion = _auc_and_noise(
            converted, _scores(single["bundle"].multitask, single["bundle"], clicked)[1])
        merged_click = roc_auc(y_click, _scores(merged["bundle"].multitask, merged["bundle"], mine)[0])
        merged_conversion = roc_auc(converted, _scores(merged["bundle"].multitask, merged["bundle"], clicked)[1])
        assert merged_click >= single_click - noise_click, (worker.config.worker_id, merged_click, single_click)
        assert merged_conversion >= single_conversion - noise_conversion, (merged_conversion, single_conversion)
        if worker is not larger:
            assert merged_click > roc_auc(y_click, _scores(before, merged["bundle"], mine)[0])


# -- a slot that moves: its former owner stops learning its held clicks ---------------------------------------


def _given(worker, slots: set[int]) -> None:
    """The group gives ``worker`` ``slots`` (its rebalance hooks: every partition revoked, then the new ones)."""
    from kafka.structs import TopicPartition

    worker._revoked({TopicPartition("events", p) for p in worker.state.epochs})
    worker._assigned({TopicPartition("events", p) for p in slots})


def _same_learner(mine: MultiTaskState, theirs: MultiTaskState) -> None:
    for name in mine.model.w:
        assert np.array_equal(mine.model.w[name], theirs.model.w[name])
        assert np.array_equal(mine.model.n[name], theirs.model.n[name])
    calibrators = [(state.calibrator.a, state.calibrator.b, state.resolved) for state in (mine, theirs)]
    assert calibrators[0] == calibrators[1]


@pytest.mark.parametrize("reads", ["first", "last"])
def test_a_former_owner_stops_learning_the_held_clicks_of_a_slot_it_gave_up(settings, tmp_path, reads):
    """Slot 1 moves from a to b. b adopts a's held clicks of it whether it reads a's checkpoint before or after
    a's own assignment callback wrote it again (``reads``: b's callback runs first or last); from then on a's
    conversion head and calibrator learn exactly what a copy of a that dropped those clicks at the move learns
    (on the former code a went on resolving them, as negatives once their window closed: learned twice in the
    group). a forgets them once it finds b's newer copy of the slot in the store (at its next rebalance)."""
    settings, store = _enabled(settings, 86_400.0), tmp_path / "store"
    records = _records(_stream_events(seed=13, events=6000))
    cut = len(records) // 2
    a, b = _worker(settings, store, "a"), _worker(settings, store, "b")
    _given(a, {0, 1})
    _given(b, {2, 3})
    _learn(a, [r for r in records[:cut] if r.partition < 2])
    _learn(b, [r for r in records[:cut] if r.partition >= 2])
    moving = _held(a.state.multitask, {1})
    assert len(moving) > 10

    reference_store = tmp_path / "reference"  # a as it was at the move, without slot 1's held clicks
    reference_store.mkdir()
    (reference_store / "a.ckpt").write_bytes(DirectoryStore(store).read("a.ckpt"))
    alone = _worker(settings, reference_store, "a")
    alone.state.multitask.joiner.adopt_merchants(None, lambda m: slot_of(m, 4) == 1)  # the peer held none: dropped

    if reads == "first":
        _given(b, {1, 2, 3})
        _given(a, {0})
    else:
        _given(a, {0})
        _given(b, {1, 2, 3})
    assert _held(b.state.multitask, {1}) == moving and _held(a.state.multitask, {1}) == []
    rest = [r for r in records[cut:] if r.partition == 0]
    assert rest[-1].event.timestamp - max(at for _, at, *_ in moving) > 2 * 86_400.0  # every moved window closes
    _learn(a, rest)
    _learn(alone, rest)
    _same_learner(a.state.multitask, alone.state.multitask)
    # parked until a learns that b took the slot: at once when b wrote its claim before a read the store
    assert a.state.multitask.joiner.stats()["parked"] == (0 if reads == "first" else len(moving))
    _given(a, {0})
    assert a.state.multitask.joiner.stats()["parked"] == 0 and _held(b.state.multitask, {1}) == moving


def test_a_slot_given_back_before_a_peer_took_it_resumes_its_held_clicks_as_they_were(settings, tmp_path):
    """Slot 1 is given up by a and given back to it before any peer wrote a copy of it (the member it went to
    died in its assignment callback): a's own copy is the newest, its held clicks come back under their own
    numbers, and a learns on exactly as a copy of a that never gave the slot up."""
    settings, store = _enabled(settings, 86_400.0), tmp_path / "store"
    records = _records(_stream_events(seed=13, events=6000))
    cut = len(records) // 2
    a = _worker(settings, store, "a")
    _given(a, {0, 1})
    _learn(a, [r for r in records[:cut] if r.partition < 2])
    held = sorted(a.state.multitask.joiner._held.items())
    reference_store = tmp_path / "reference"
    reference_store.mkdir()
    (reference_store / "a.ckpt").write_bytes(DirectoryStore(store).read("a.ckpt"))
    kept = _worker(settings, reference_store, "a")

    _given(a, {0})
    assert _held(a.state.multitask, {1}) == [] and a.state.multitask.joiner.stats()["parked"] > 10
    _given(a, {0, 1})
    assert sorted(a.state.multitask.joiner._held.items()) == held and a.state.multitask.joiner.stats()["parked"] == 0
    rest = [r for r in records[cut:] if r.partition < 2]
    _learn(a, rest)
    _learn(kept, rest)
    _same_learner(a.state.multitask, kept.state.multitask)
