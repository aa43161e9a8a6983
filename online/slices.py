"""Partition slices: the per-merchant state a learner owns through the partition its merchant's events are on.

A merchant's clicks and orders are keyed by merchant, so they sit on the same partition number ``p`` of the
two (equally partitioned) topics: that number is the merchant's *slot*. A worker's checkpoint holds, next
to its own shared model, the per-merchant parts of every slot it learned (feature context, candidate
sources, per-merchant ranker weights and steps, per-merchant metrics, events learned) and per slot the
offsets, the number of events learned into it and its fencing epoch, all in one checkpoint written whole.
Each owner takes a new epoch for slot ``p`` when it is assigned ``p`` (one above any copy in the store) and
writes it at once; the newest copy of ``p`` is the one with the highest epoch, then the most events, so a
stale owner (stalled past the session timeout) that writes after ``p`` moved is ignored. A new owner
adopts the newest copy (in the group's store, :mod:`online.store`) and resumes from its offsets, and a
publication assembles one version from the newest copy of every slot (``online/README.md``, "Scale-out").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from kafka.partitioner.default import murmur2

from fedstream.files import loads_versioned
from fedstream.logs import get_logger
from online.store import CheckpointStore

log = get_logger("online.slices")

def slot_of(merchant_id: str, partitions: int) -> int:
    """The partition of ``merchant_id``'s events on a topic of ``partitions`` (the producer's murmur2)."""
    return (murmur2(merchant_id.encode()) & 0x7FFFFFFF) % partitions


def tables(context: Any, recommender: Any, evaluator: Any, merchant_events: dict[str, int]) -> dict[str, dict]:
    """The dicts keyed by merchant id that make up a learner's per-merchant state (live objects: changing
    them changes the state)."""
    out = {"context": context.merchants, "metrics": evaluator.merchants, "events": merchant_events}
    if hasattr(recommender, "ranker") and hasattr(recommender, "state"):  # the two-stage ShopRecommender
        out.update(shops=recommender.state.shops, ranker=recommender.ranker.merchants, steps=recommender.merchant_steps)
    return out


def saved_tables(saved: dict[str, Any]) -> dict[str, dict]:
    """:func:`tables` of a checkpoint read from disk (its context is plain data: rebuilt here)."""
    from streams.features import FeatureContext

    return tables(FeatureContext.from_state(saved["context"]), saved["recommender"], saved["evaluator"],
                  saved.setdefault("merchant_events", {}))


def replace_merchants(mine: dict[str, dict], theirs: dict[str, dict], owned: Callable[[str], bool]) -> None:
    """Make the entries of the merchants ``owned`` says yes to, in each of ``mine``'s tables (by name: dicts
    keyed by merchant), exactly those of ``theirs``' table of that name (dropping those ``theirs`` lacks)."""
    for name, table in mine.items():
        for merchant in [m for m in table if owned(m)]:
            del table[merchant]
        table.update({m: value for m, value in theirs.get(name, {}).items() if owned(m)})


def replace_slot(mine: dict[str, dict], theirs: dict[str, dict], slot: int, partitions: int) -> None:
    """Make ``mine``'s merchants of ``slot`` exactly ``theirs``' (dropping those ``theirs`` lacks)."""
    replace_merchants(mine, theirs, lambda merchant: slot_of(merchant, partitions) == slot)


def adopt(state: Any, saved: dict[str, Any], slots: Iterable[int]) -> None:
    """Replace ``state``'s parts of ``slots`` by those of the checkpoint ``saved`` (their newest copy):
    per-merchant tables, the prediction monitors' merchants (drift detectors), the multi-task learner's held
    clicks of those merchants, the slot's offsets and event count. Merchants of the slot that ``saved`` does
    not know are dropped (their events were not learned in the newest copy)."""
    slots = frozenset(slots)
    mine = tables(state.context, state.recommender, state.evaluator, state.merchant_events)
    theirs = saved_tables(saved)

    def owned(merchant: str) -> bool:
        return slot_of(merchant, state.partitions) in slots

    for name, monitor in state.monitors.items():
        monitor.adopt_merchants(saved.get("monitors", {}).get(name), owned)
    if state.multitask is not None:
        state.multitask.adopt_merchants(saved.get("multitask"), owned)
    for slot in slots:
        replace_slot(mine, theirs, slot, state.partitions)
        for key in [key for key in state.offsets if key[1] == slot]:
            del state.offsets[key]
        state.offsets.update({key: offset for key, offset in saved["offsets"].items() if key[1] == slot})
        state.slots[slot] = saved["slots"][slot]
        state.epochs[slot] = saved.get("epochs", {}).get(slot, 0)


def own_slots(state: Any, slots: Iterable[int]) -> None:
    """Learn from now on only from the merchants of ``slots`` (those the group gives ``state``'s worker now):
    the multi-task learner's held clicks of the other slots are parked, never resolved here but still in the
    checkpoint their slot's next owner adopts, which it may read before or after this; those of ``slots``
    parked earlier come back (the slot returned before a peer took it). Every other per-merchant part learns
    only from its merchant's events, which come only with its slot, so it needs nothing here."""
    if state.multitask is not None:
        slots = frozenset(slots)
        state.multitask.own_merchants(lambda merchant: slot_of(merchant, state.partitions) in slots)


def drop_taken(state: Any, store: dict[str, dict[str, Any]], slots: Iterable[int]) -> None:
    """Forget ``state``'s held clicks of every slot but ``slots`` that a peer took after ``state``'s copy
    (a higher fencing epoch in ``store``): that peer adopted them from our copy or a newer one."""
    if state.multitask is None:
        return
    slots = frozenset(slots)
    taken = {slot for saved in store.values() for slot, epoch in saved.get("epochs", {}).items()
             if slot not in slots and epoch > state.epochs.get(slot, 0)}
    if taken:
        state.multitask.drop_merchants(lambda merchant: slot_of(merchant, state.partitions) in taken)


def read_store(store: CheckpointStore, version: int, skip: str | None = None) -> dict[str, dict[str, Any]]:
    """Every readable worker checkpoint in ``store`` by name, but ``skip`` (an unreadable one is logged and
    skipped: a peer may be mid-write on a file system without atomic rename, or hold another format)."""
    found = {}
    for name in store.names():
        payload = None if name == skip else store.read(name)
        if payload is None:
            continue
        try:
            found[name] = loads_versioned(payload, store.where(name), version, "learner worker")
        except ValueError as exc:
            log.warning("peer checkpoint skipped", extra={"checkpoint": store.where(name), "error": str(exc)})
    return found


def copy_rank(saved: dict[str, Any], slot: int) -> tuple[int, int]:
    """How new a checkpoint's copy of ``slot`` is: its fencing epoch first (a later owner's copy wins even
    with fewer events: the earlier owner's later writes are a stale owner's), then the events learned."""
    return saved.get("epochs", {}).get(slot, 0), saved["slots"][slot]


def newest_epoch(store: dict[str, dict[str, Any]], slot: int) -> int:
    """The highest fencing epoch any checkpoint in ``store`` took for ``slot`` (0: none)."""
    return max((saved.get("epochs", {}).get(slot, 0) for saved in store.values()), default=0)


def newest(store: dict[str, dict[str, Any]]) -> dict[int, str]:
    """For every slot, the checkpoint holding its newest copy (:func:`copy_rank`)."""
    best: dict[int, tuple[tuple[int, int], str]] = {}
    for name, saved in sorted(store.items()):
        for slot in saved.get("slots", {}):
            if slot not in best or copy_rank(saved, slot) > best[slot][0]:
                best[slot] = (copy_rank(saved, slot), name)
    return {slot: name for slot, (_, name) in best.items()}


__all__ = ["adopt", "copy_rank", "drop_taken", "newest", "newest_epoch", "own_slots", "read_store", "replace_merchants", "replace_slot", "saved_tables", "slot_of", "tables"]
