"""The recommender's inlined update path (``CandidateState.choose_one`` for one-item steps, the co-occurrence and
transition updates row by row, ``ShopRecommender.observe_block`` taking clicks straight to it) leaves the same
state as the former code (``tests/recs_reference.py``) on seeded hostile streams: tiny caps (rows capped and
the own row overflowing mid-step), pruned items, popularity rescaled to a new landmark, evicted users and
trimmed histories, repeats, duplicate and one-item order lines, new merchants seen only through unclicked
impressions, catalog items arriving after they were chosen, and text rows closed when an item is first chosen."""

from __future__ import annotations

import random

import numpy as np
import pytest

from online.candidates import CandidateState
from online.ranking import ShopRecommender
from streams.schemas import CatalogItem, Click, LineItem, Order
from streams.text import DIM, ItemTextEmbeddings
from tests.recs_reference import ReferenceRecommender, ReferenceState
from tests.test_recs_fastpath import assert_same_candidates, assert_same_ranker, assert_same_recommendations


def hostile(seed: int, n: int = 3_000, items: int = 40, users: int = 30, span_s: float = 5 * 86_400.0) -> list:
    """Clicks (a quarter clicked), orders and catalog items of 3 merchants, in time order, with many ties."""
    rng = random.Random(seed)
    names = [f"{rng.choice('abc')}{k}" for k in range(items)]  # ids whose order is not their number's
    events, when = [], 1.7e9
    for k in range(n):
        when += rng.choice([0.0, 0.0, 1.0, 30.0, 600.0, 4_000.0]) * (span_s / (n * 700.0))
        merchant, user = f"m{rng.randrange(3)}", f"u{rng.randrange(users)}"
        roll = rng.random()
        if roll < 0.7:
            item = rng.choice(names[: rng.choice([3, items])])  # a few hot items: repeats, consecutive ones
            events.append(Click(event_id=f"e{k}", merchant_id=merchant, user_id=user, item_id=item,
                                session_id=f"s{rng.randrange(4)}", timestamp=when, position=0, page="home",
                                device="app", clicked=rng.random() < 0.25))
        elif roll < 0.93:
            lines = [rng.choice(names) for _ in range(rng.choice([1, 1, 2, 3, 6]))]  # duplicates too
            events.append(Order(event_id=f"e{k}", order_id=f"o{k}", merchant_id=merchant, user_id=user,
                                timestamp=when, currency="EUR", session_id=rng.choice([None, f"s{rng.randrange(4)}"]),
                                items=[LineItem(item_id=i, quantity=1, unit_price=1.0) for i in lines]))
        else:
            events.append(CatalogItem(event_id=f"e{k}", merchant_id=merchant, item_id=rng.choice(names),
                                      category=f"c{rng.randrange(4)}", price=1.0, title="t", timestamp=when))
    events.append(Click(event_id="new", merchant_id="m-new", user_id="u0", item_id="x", session_id="s",
                        timestamp=when, position=0, page="home", device="app", clicked=False))
    return events


CASES = {
    "tiny caps and bounds": ({"history": 4, "max_items": 6, "max_neighbors": 2, "max_users": 5,
                              "max_user_items": 2}, hostile(1)),
    "rows overflow mid-step": ({"history": 12, "max_neighbors": 3, "max_user_items": 4}, hostile(2, items=25)),
    "landmark rescaled": ({"half_life_s": 3 * 3600.0, "session_gap_s": 60.0}, hostile(3, span_s=80 * 86_400.0)),
    "defaults, wide catalog": ({}, hostile(4, n=4_000, items=300, users=80)),
    "one user, one hot item": ({"history": 3}, hostile(5, items=4, users=1)),
}


def with_text(state: CandidateState, events: list) -> None:
    """Give every merchant text rows for its catalog items (a real :class:`ItemTextEmbeddings` with seeded
    vectors in place of the encoder's), all open."""
    for event in events:
        if type(event) is CatalogItem:
            shop = state.shop(event.merchant_id)
            shop.text = shop.text or ItemTextEmbeddings()
            if event.item_id not in shop.text.index:
                shop.text.index[event.item_id] = len(shop.text_items)
                shop.text_items.append(event.item_id)
                shop.text_open.append(1)
    for merchant, shop in state.shops.items():
        vectors = np.random.default_rng(int(merchant[1:])).standard_normal((len(shop.text_items), DIM))
        shop.text.matrix = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def assert_same_text(fast: CandidateState, reference: CandidateState) -> None:
    for merchant, shop in fast.shops.items():
        assert shop.text_open == reference.shops[merchant].text_open, merchant


def pair(bounds: dict, events: list, seed: int = 5) -> tuple[ShopRecommender, ReferenceRecommender]:
    fast = ShopRecommender(candidates=CandidateState(**bounds), seed=seed, warm_up_steps=30, train_every=5)
    reference = ReferenceRecommender(candidates=ReferenceState(**bounds), seed=seed, warm_up_steps=30, train_every=5)
    for recommender in (fast, reference):
        with_text(recommender.state, events)
    return fast, reference


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_leave_the_former_codes_state_on_hostile_streams(name: str):
    bounds, events = CASES[name]
    fast, reference = pair(bounds, events)
    for event in events:
        reference.observe(event)
    cuts = sorted(random.Random(2).sample(range(len(events)), 40))
    for start, end in zip([0, *cuts], [*cuts, len(events)]):
        fast.observe_block(events[start:end])
    assert_same_candidates(fast.state, reference.state)
    assert_same_text(fast.state, reference.state)
    assert_same_ranker(fast, reference)
    assert np.isfinite(fast.ranker.weights).all()
    assert_same_recommendations(fast, reference, events)


@pytest.mark.parametrize("name", ["tiny caps and bounds", "landmark rescaled"])
def test_event_by_event_leaves_the_former_codes_state(name: str):
    bounds, events = CASES[name]
    fast, reference = pair(bounds, events)
    for event in events:
        reference.observe(event)
        fast.observe(event)
    assert_same_candidates(fast.state, reference.state)
    assert_same_text(fast.state, reference.state)
    assert_same_ranker(fast, reference)


def test_the_hostile_streams_reach_the_rare_paths():
    """The cases above are only worth their name if caps, prunes, rescales and evictions happen in them."""
    bounds, events = CASES["tiny caps and bounds"]
    state = CandidateState(**bounds)
    for event in events:
        state.observe(event)
    shop = state.shops["m0"]
    assert len(shop.users) == 5 and len(shop.stats) <= 12 and max(map(len, shop.co.as_dict().values())) <= 4
    assert all(len(u.items) <= 4 for u in shop.users.values()) and "m-new" in state.shops
    bounds, events = CASES["landmark rescaled"]
    state = CandidateState(**bounds)
    for event in events:
        state.observe(event)
    assert state.shops["m0"].landmark > events[0].timestamp + 86_400.0  # moved at least once
