"""The candidate state keeps one object per item and user id (``sys.intern``): decoding makes a new string
for every id of every event, and a dict lookup by a string that is not the stored key's object reads that
key's hash and characters (scattered over the heap: cache misses) where the same object matches at once.
Fed events whose ids are fresh strings, as the consumer decodes them, the recommender leaves the frozen
reference's state and ranker (value for value), and every id it holds, wherever it holds it, is one object."""

from __future__ import annotations

import msgspec
import pytest

from online.ranking import ShopRecommender
from streams.schemas import CatalogItem, Click, Order
from tests.test_recs_fastpath import assert_same_candidates, assert_same_ranker
from tests.test_recs_update_fast import CASES, pair


def fresh(text: str) -> str:
    """An equal string that is another object, as decoding an event makes one."""
    return "".join(list(text))


def decoded(event):
    """``event`` with its item and user ids (an order's lines too) fresh strings."""
    if type(event) is Order:
        lines = [msgspec.structs.replace(line, item_id=fresh(line.item_id)) for line in event.items]
        return msgspec.structs.replace(event, user_id=fresh(event.user_id), items=lines)
    if type(event) is Click:
        return msgspec.structs.replace(event, item_id=fresh(event.item_id), user_id=fresh(event.user_id))
    return msgspec.structs.replace(event, item_id=fresh(event.item_id))


def held_ids(recommender: ShopRecommender):
    """Every item and user id the candidate state holds: dict keys, rows, histories, steps, rankings."""
    for shop in recommender.state.shops.values():
        for table in (shop.catalog, shop.unchosen, shop.stats, shop.popularity, shop.codes, shop.codes.ids,
                      shop.users, shop.ranked):
            yield from table
        for user in shop.users.values():
            yield from user.items
            yield from user.recent
            yield from user.last_step


def assert_one_object_per_id(recommender: ShopRecommender) -> None:
    first: dict[str, str] = {}
    held = 0
    for text in held_ids(recommender):
        assert first.setdefault(text, text) is text, text
        held += 1
    assert held > 2 * len(first)  # ids held many times over: the check has something to check


@pytest.mark.parametrize("path", ["blocks", "event by event"])
@pytest.mark.parametrize("name", ["defaults, wide catalog", "tiny caps and bounds"])
def test_fresh_id_strings_leave_the_reference_state_with_one_object_per_id(name: str, path: str):
    bounds, events = CASES[name]
    fresh_events = [decoded(event) for event in events]
    assert fresh_events == events
    assert sum(type(e) is CatalogItem for e in events) and sum(type(e) is Order for e in events)
    fast, reference = pair(bounds, events)
    for event in fresh_events:
        reference.observe(event)
    if path == "blocks":
        for start in range(0, len(fresh_events), 97):
            fast.observe_block(fresh_events[start:start + 97])
    else:
        for event in fresh_events:
            fast.observe(event)
    assert_same_candidates(fast.state, reference.state)
    assert_same_ranker(fast, reference)
    assert_one_object_per_id(fast)


def renamed(event, prefix: str):
    """``event`` with its user and item ids prefixed: strings no other test has interned."""
    ids = {}
    if type(event) is Order:
        ids["items"] = [msgspec.structs.replace(line, item_id=prefix + line.item_id) for line in event.items]
    else:
        ids["item_id"] = prefix + event.item_id
    if type(event) is not CatalogItem:
        ids["user_id"] = prefix + event.user_id
    return msgspec.structs.replace(event, **ids)


def test_an_unpickled_state_holds_the_interned_ids():
    """A worker resumed from its checkpoint (or a served bundle) unpickles the state: its ids are new objects,
    none of them interned, so the interned ids of the events that come next would match none by identity.
    Once loaded (in a process where those ids are not interned yet, as at a worker's start), every id it
    holds is the interned object, one per id, and it goes on as a state loaded without interning does."""
    import gc
    import pickle
    import sys

    bounds, events = CASES["defaults, wide catalog"]
    events = [renamed(event, "resumed-") for event in events]
    half = len(events) // 2
    kept, _ = pair(bounds, events)
    kept.observe_block([decoded(event) for event in events[:half]])
    blob = pickle.dumps(kept, protocol=pickle.HIGHEST_PROTOCOL)
    rest = [decoded(event) for event in events[half:]]
    del kept, events
    gc.collect()  # the interned ids die with the state that held them
    resumed = pickle.loads(blob)
    held = list(held_ids(resumed))
    assert len(set(held)) > 50
    for text in held:
        assert sys.intern(fresh(text)) is text, text
    assert_one_object_per_id(resumed)
    plain = pickle.loads(blob)  # its ids were interned by the first load: it keeps its own objects
    resumed.observe_block(rest)
    plain.observe_block(rest)
    assert_same_candidates(resumed.state, plain.state)
    assert_same_ranker(resumed, plain)
