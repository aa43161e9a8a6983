"""The recommender's native reading side (``features`` through ``online.rank_kernels``) equals the row-by-row
Python code bit for bit: feature matrices, ``rank()`` outputs (items, scores, sources) and the whole training
trajectory, on seeded varied streams (``tests/test_recs_fastpath.py``'s) and hostile candidates."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from online.candidates import CandidateState, ItemStats
from online.ranking import ShopRecommender, features, features_reference
from streams.schemas import CatalogItem, Click, LineItem, Order
from tests.recs_reference import reference_features
from tests.test_recs_fastpath import assert_same_candidates, streams


class RowByRowRecommender(ShopRecommender):
    """:class:`ShopRecommender` whose training and ranking compute the features row by row in Python."""

    feature_matrix = staticmethod(features_reference)


def assert_same_matrix(shop, user, items, masks, co, trans, when) -> None:
    fast = features(shop, user, items, masks, co, trans, when)
    rows = features_reference(shop, user, items, masks, co, trans, when)
    frozen = reference_features(shop, user, items, masks, co, trans, when)
    assert fast.shape == rows.shape == (len(items), 22) and fast.dtype == np.float64
    assert fast.tobytes() == rows.tobytes() == frozen.tobytes()  # bit for bit, signed zeros included


def asked(events: list, n: int, seed: int) -> list:
    steps = [e for e in events if type(e) in (Click, Order)]
    return random.Random(seed).sample(steps, min(n, len(steps)))


@pytest.mark.parametrize("name", list(streams()))
def test_native_features_and_rankings_equal_the_python_rows(name: str):
    events, bounds = streams()[name]
    fast = ShopRecommender(candidates=CandidateState(**bounds), seed=3)
    rows = RowByRowRecommender(candidates=CandidateState(**bounds), seed=3)
    cuts = sorted(random.Random(2).sample(range(len(events)), 20))
    checked = 0
    for start, end in zip([0, *cuts], [*cuts, len(events)]):
        fast.observe_block(events[start:end])
        rows.observe_block(events[start:end])
        # the whole training trajectory so far: same weights and squares bit for bit, same generator state
        assert fast.ranker.weights.tobytes() == rows.ranker.weights.tobytes()
        assert fast.ranker.squares.tobytes() == rows.ranker.squares.tobytes()
        assert fast.rng.getstate() == rows.rng.getstate()
        for event in asked(events[:end], 6, end):
            for item_id in (None, getattr(event, "item_id", None)):
                for k in (1, 10, 200):
                    mine = fast.rank(event.merchant_id, event.user_id, k, item_id=item_id, timestamp=event.timestamp)
                    theirs = rows.rank(event.merchant_id, event.user_id, k, item_id=item_id, timestamp=event.timestamp)
                    assert mine == theirs  # items, sources and scores, exactly
                    checked += bool(mine)
    assert fast.ranker.updates == rows.ranker.updates > 0
    for merchant, (weights, squares) in fast.ranker.merchants.items():
        assert weights.tobytes() == rows.ranker.merchants[merchant][0].tobytes()
        assert squares.tobytes() == rows.ranker.merchants[merchant][1].tobytes()
    assert checked > 100


def hostile_cases(recommender: ShopRecommender, events: list):
    """Candidate lists the ranker may be asked about: proposals of known, unknown and absent users, subsets,
    repeats, items never seen, chosen items whose statistics were pruned, and odd clocks."""
    rng = random.Random(5)
    for event in asked(events, 40, 7):
        shop = recommender.state.shops[event.merchant_id]
        proposed, co, trans = recommender.state.propose(event.merchant_id, event.user_id, 150,
                                                        item_id=getattr(event, "item_id", None))
        items = list(proposed)
        masks = list(proposed.values())
        user = shop.users.get(event.user_id)
        stranger = next(iter(shop.users.values()))
        yield shop, user, items, masks, co, trans, event.timestamp
        yield shop, None, items, masks, co, trans, event.timestamp  # nobody: no history, no categories
        yield shop, stranger, items, masks, co, trans, event.timestamp - 30 * 86_400.0  # gaps below 1 s
        yield shop, user, items[:1], masks[:1], co, trans, int(event.timestamp)  # an int clock
        picked = rng.sample(range(len(items)), min(9, len(items)))
        yield shop, user, [items[i] for i in picked], [masks[i] for i in picked], {}, {}, event.timestamp
        mixed = [*(items[:3] * 2), "never-seen", "never-seen-2", *(list(user.items) if user else [])]
        yield shop, user, mixed, [rng.randrange(32) for _ in mixed], co, trans, event.timestamp + 1e7


@pytest.mark.parametrize("name", ["clicks+orders", "consumables, bounded", "bounds and eviction"])
def test_native_features_equal_on_hostile_candidates(name: str):
    events, bounds = streams()[name]
    recommender = ShopRecommender(candidates=CandidateState(**bounds), seed=1)
    recommender.observe_block(events)
    shop = next(iter(recommender.state.shops.values()))
    user = next(u for u in shop.users.values() if u.items)
    pruned = next(iter(user.items))
    shop.stats.pop(pruned, None)  # chosen by the user, statistics gone (as _prune_items leaves it)
    shop.stats["odd"] = ItemStats(count=3.0, repeats=3.0, gap_sum=0.0, gap_sq=0.0)  # zero-variance repeats
    user.items["odd"] = [2, 1, shop.clock - 0.5]
    assert_same_matrix(shop, user, [pruned, "odd", "missing"], [1, 3, 0], {"odd": 0.5}, {}, shop.clock)
    for case in hostile_cases(recommender, events):
        assert_same_matrix(*case)
    empty = features(shop, user, [], [], {}, {}, shop.clock)
    assert empty.shape == (0, 22)


def test_a_pickled_recommender_ranks_the_same_natively():
    events, _ = streams()["consumables with repeats"]
    recommender = ShopRecommender(seed=4)
    recommender.observe_block(events)
    copy = pickle.loads(pickle.dumps(recommender))
    rows = pickle.loads(pickle.dumps(recommender))
    rows.__class__ = RowByRowRecommender
    for event in asked(events, 30, 3):
        assert copy.rank(event.merchant_id, event.user_id, 10) == rows.rank(event.merchant_id, event.user_id, 10)


def test_the_kernel_loads_with_a_recommender_not_with_the_module_nor_on_the_first_rank():
    """Importing ``online.ranking`` (the API does, before any model) does not load the kernel; unpickling a
    published recommender does, so its first ranking pays no import or compilation."""
    events, _ = streams()["orders only"]
    recommender = ShopRecommender(seed=4)
    recommender.observe_block(events[:2_000])
    script = ("import pickle, sys\nimport online.ranking\nassert 'online.rank_kernels' not in sys.modules\n"
              "recommender = pickle.loads(sys.stdin.buffer.read())\nassert 'online.rank_kernels' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(recommender), capture_output=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr.decode()[-2000:]


@pytest.mark.parametrize("name", ["clicks+orders", "orders only", "bounds and eviction", "consumables, bounded"])
def test_may_propose_is_false_only_when_propose_holds_no_chosen_item(name: str):
    """Exactness of the training-step filter on every step of seeded streams, for small and usual limits
    (a False skips a proposal that could not hold a positive; a True may still find none)."""
    events, bounds = streams()[name]
    state = CandidateState(**bounds)
    skipped = asked_steps = 0
    for event in events:
        step = CandidateState.step_of(event)
        shop = state.shops.get(event.merchant_id)
        if step is not None and shop is not None and shop.popularity:
            user = shop.users.get(event.user_id)
            for limit in (12, 60):
                may = state.may_propose(shop, user, step[0], limit)
                proposed, _, _ = state.propose(event.merchant_id, event.user_id, limit)
                assert may or not any(item in proposed for item in step[0]), (limit, step[0])
                skipped += not may
                asked_steps += 1
        state.fold(event, step)
    assert asked_steps > 200 and skipped > 20


def test_may_propose_skips_catalog_items_past_the_cold_start_and_history_past_the_newest():
    """The two cases a proposal used to be computed for in vain (42% of the training proposals on the online
    benchmark's backlog): an unchosen item deep in the catalog, and an item the user chose long ago."""
    state = CandidateState(history=3)
    for k in range(200):
        state.observe(CatalogItem(event_id=f"c{k}", merchant_id="m", item_id=f"c{k:03d}", category="a", price=1.0,
                                  title=f"item {k}", timestamp=1.0))
    for k in range(100, 130):  # one order a day: no transitions, each the newest and most popular so far
        state.observe(Order(event_id=f"o{k}", order_id=f"o{k}", merchant_id="m", user_id="u", currency="EUR",
                            timestamp=86_400.0 * k, items=[LineItem(item_id=f"c{k:03d}", quantity=1, unit_price=1.0)]))
    shop, user = state.shops["m"], state.shops["m"].users["u"]
    cases = {(60, "c199"): False, (60, "c031"): True, (12, "c100"): False, (12, "c125"): True, (60, "c100"): False,
             (60, "c110"): True}
    for (limit, item), expected in cases.items():
        proposed, _, _ = state.propose("m", "u", limit)
        assert (item in proposed) is expected, (limit, item)
        assert state.may_propose(shop, user, (item,), limit) is expected, (limit, item)


@pytest.mark.parametrize("name", list(streams()))
def test_ranked_ids_are_the_ranked_items_whenever_they_can_hold_the_actual_one(name: str):
    """The worker's ranking evaluation (``ranked_ids``) on the steps of seeded streams, before each is folded
    in as the worker asks: the items ``rank()`` shows whenever they hold the actual item, else those or
    ``[]`` (a miss either way: the same hit rate and NDCG), the same state after (popular items re-ranked
    alike, the same training); both shortcuts taken (no proposal; a proposal without the actual item)."""
    events, bounds = streams()[name]
    ranking = ShopRecommender(candidates=CandidateState(**bounds), seed=3)
    evaluating = ShopRecommender(candidates=CandidateState(**bounds), seed=3)
    unproposed = absent = hits = 0
    for n, event in enumerate(events):
        step = CandidateState.step_of(event)
        if step is not None and n % 2 == 0:
            actual, k = step[0][0], (10, 1, 200)[n % 3]
            shop = ranking.state.shops.get(event.merchant_id)
            if shop is not None:  # counted on the ranking side: may_propose re-ranks as propose then does
                limit = max(ranking.candidate_limit, k)
                may = ranking.state.may_propose(shop, shop.users.get(event.user_id), (actual,), limit)
                proposed, _, _ = ranking.state.propose(event.merchant_id, event.user_id, limit)
                assert may or actual not in proposed
                unproposed += not may
                absent += may and actual not in proposed
            shown = [r.item_id for r in ranking.rank(event.merchant_id, event.user_id, k, timestamp=event.timestamp)]
            ids = evaluating.ranked_ids(event.merchant_id, event.user_id, actual, k, timestamp=event.timestamp)
            assert ids == shown if actual in shown else ids in ([], shown), (n, actual, ids, shown)
            hits += actual in shown
        ranking.observe(event)
        evaluating.observe(event)
    assert_same_candidates(evaluating.state, ranking.state)
    assert evaluating.ranker.weights.tobytes() == ranking.ranker.weights.tobytes()
    assert evaluating.rng.getstate() == ranking.rng.getstate()
    assert unproposed >= 5 and hits >= 30 and (absent >= 5 or bounds), (unproposed, absent, hits)


def test_the_ranking_kernel_keeps_the_gil():
    """Serving ranks on its event loop (``serving.holder.RankingPlacement``) and the kernel runs ~0.1 ms: released
    there, the GIL went to another thread of the server at every request and came back only at the switch
    interval (``BENCH_QUICK=1 python -m benchmarks.serving``: p99 15-44 ms at 300 req/s with ``nogil=True``,
    1.5 ms without). A structural check, not a timing: the benchmark holds the figure."""
    from online import rank_kernels

    assert not rank_kernels.feature_rows.targetoptions.get("nogil", False)
