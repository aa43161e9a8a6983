"""The recommender's fast update path (``observe_block``, the inlined co-occurrence update, the numba AdaGrad
step, training skipped when no chosen item can be a candidate) equals the former code on seeded streams."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from online.candidates import CandidateState
from online.link_rows import LinkRows
from online.ranking import ShopRecommender
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click, Order
from tests.recs_reference import ReferenceRanker, ReferenceRecommender, ReferenceState
from tests.test_recs_ranking import shop_stream

BOUNDS = {"history": 6, "max_items": 40, "max_neighbors": 4, "max_users": 25, "max_user_items": 3}


def generated(events: int = 6_000, seed: int = 11) -> list:
    return list(generate(GeneratorConfig(merchants=3, events=events, seed=seed, days=3.0,
                                         items_per_merchant=(60, 300))))


def streams() -> dict[str, tuple[list, dict]]:
    mixed = generated()
    return {
        "clicks+orders": (mixed, {}),
        "orders only": ([e for e in mixed if type(e) is not Click], {}),
        "clicks only": ([e for e in mixed if type(e) is not Order], {}),
        "consumables with repeats": (shop_stream(5), {}),
        "bounds and eviction": (generated(4_000, seed=12), BOUNDS),
        "consumables, bounded": (shop_stream(6), BOUNDS),
    }


def links(shop, name: str) -> tuple[dict, dict]:
    """A shop's rows and row totals of table ``name`` as dicts (the reference holds them so)."""
    table = getattr(shop, name)
    if isinstance(table, LinkRows):
        return table.as_dict(), table.totals()
    return table, getattr(shop, f"totals_{name}")


def assert_same_candidates(fast, reference) -> None:
    assert list(fast.shops) == list(reference.shops)
    for merchant, shop in fast.shops.items():
        ref = reference.shops[merchant]
        for name in ("clock", "landmark", "totals", "since_rank"):
            assert getattr(shop, name) == getattr(ref, name), (merchant, name)
        for name in ("stats", "catalog", "unchosen", "ranked"):  # same entries in the same order
            assert list(getattr(shop, name)) == list(getattr(ref, name)), (merchant, name)
            assert getattr(shop, name) == getattr(ref, name), (merchant, name)
        for name in ("co", "trans"):  # exact counts and totals, each row in the same order (ties keep it)
            (rows, totals), (ref_rows, ref_totals) = links(shop, name), links(ref, name)
            assert {a: list(row.items()) for a, row in rows.items()} == {a: list(row.items())
                                                                          for a, row in ref_rows.items()}, (merchant, name)
            assert totals == ref_totals, (merchant, name)
        assert list(shop.popularity) == list(ref.popularity)
        np.testing.assert_allclose(list(shop.popularity.values()), list(ref.popularity.values()), rtol=1e-12)
        assert list(shop.users) == list(ref.users)
        for user_id, user in shop.users.items():
            assert user == ref.users[user_id], (merchant, user_id)
            assert list(user.items.items()) == list(ref.users[user_id].items.items())


def assert_same_ranker(fast, reference) -> None:
    assert fast.ranker.updates == reference.ranker.updates > 0
    np.testing.assert_allclose(fast.ranker.weights, reference.ranker.weights, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(fast.ranker.squares, reference.ranker.squares, rtol=1e-12, atol=1e-12)
    assert list(fast.ranker.merchants) == list(reference.ranker.merchants)
    for merchant, (weights, squares) in fast.ranker.merchants.items():
        np.testing.assert_allclose(weights, reference.ranker.merchants[merchant][0], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(squares, reference.ranker.merchants[merchant][1], rtol=1e-12, atol=1e-12)
    assert fast.rng.getstate() == reference.rng.getstate()
    assert (fast.merchant_steps, fast.steps, fast.n_observed) == (reference.merchant_steps, reference.steps,
                                                                  reference.n_observed)


def assert_same_recommendations(fast, reference, events: list) -> None:
    asked = 0
    for event in random.Random(0).sample([e for e in events if type(e) in (Click, Order)], 40):
        for item_id in (None, getattr(event, "item_id", None)):
            mine = fast.rank(event.merchant_id, event.user_id, 10, item_id=item_id)
            theirs = reference.rank(event.merchant_id, event.user_id, 10, item_id=item_id)
            assert [(r.item_id, r.source) for r in mine] == [(r.item_id, r.source) for r in theirs]
            np.testing.assert_allclose([r.score for r in mine], [r.score for r in theirs], rtol=1e-12)
            asked += bool(mine)
    assert asked > 20


@pytest.mark.parametrize("name", list(streams()))
def test_the_fast_path_equals_the_former_code(name: str):
    events, bounds = streams()[name]
    reference = ReferenceRecommender(candidates=ReferenceState(**bounds), seed=3)
    for event in events:
        reference.observe(event)
    fast = ShopRecommender(candidates=CandidateState(**bounds), seed=3)
    cuts = sorted(random.Random(1).sample(range(len(events)), 30))  # blocks of uneven sizes, as the worker's
    for start, end in zip([0, *cuts], [*cuts, len(events)]):
        fast.observe_block(events[start:end])
    assert_same_candidates(fast.state, reference.state)
    assert_same_ranker(fast, reference)
    assert_same_recommendations(fast, reference, events)
    if bounds:
        assert len(fast.state.shops[events[-1].merchant_id].users) <= bounds["max_users"]


def test_event_by_event_equals_blocks_and_pickles_resume_alike():
    events = generated(3_000, seed=13)
    by_event, by_block = ShopRecommender(seed=2), ShopRecommender(seed=2)
    for event in events[:1_500]:
        by_event.observe(event)
    by_block.observe_block(events[:1_500])
    by_event, by_block = pickle.loads(pickle.dumps(by_event)), pickle.loads(pickle.dumps(by_block))
    for event in events[1_500:]:
        by_event.observe(event)
    by_block.observe_block(events[1_500:])
    assert_same_candidates(by_block.state, by_event.state)
    assert_same_ranker(by_block, by_event)


def test_a_recommender_pickled_by_the_former_code_serves_the_same_and_learns_on_alike():
    """``tests/data/recommender_before_fastpath.pkl``: pickled by the code before the fast path (commit and stream
    in the JSON next to it, with the rankings that code returned for it)."""
    data = Path(__file__).parent / "data"
    blob = (data / "recommender_before_fastpath.pkl").read_bytes()
    expected = json.loads((data / "recommender_before_fastpath.json").read_text())
    served = pickle.loads(blob)
    assert type(served) is ShopRecommender and served.ranker.updates == 125
    for ask in expected["rankings"]:
        top = served.rank(ask["merchant"], ask["user"], 5, item_id=ask["item_id"])
        assert [[r.item_id, r.source] for r in top] == [[item, source] for item, _, source in ask["top"]]
        np.testing.assert_allclose([r.score for r in top], [score for _, score, _ in ask["top"]], rtol=1e-12)
    fast, reference = pickle.loads(blob), pickle.loads(blob)  # ranking re-ranks the popular items: fresh copies
    reference.__class__, reference.state.__class__, reference.ranker.__class__ = (ReferenceRecommender,
                                                                                  ReferenceState, ReferenceRanker)
    reference.state.hold_rows_as_dicts()
    rest = list(generate(GeneratorConfig(merchants=2, events=2500, seed=21, days=2.0,
                                         items_per_merchant=(30, 80))))[1800:]
    for event in rest:
        reference.observe(event)
    fast.observe_block(rest)
    assert_same_candidates(fast.state, reference.state)
    assert_same_ranker(fast, reference)
    assert fast.ranker.updates > 125
