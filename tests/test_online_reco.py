"""Recommender (candidates, exclusions, bounds, pickling) and prequential metrics (AUC, ECE, HitRate, NDCG)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from online.learners import FTRLProximalClassifier
from online.prequential import PrequentialEvaluator, reliability, roc_auc
from online.reco import Recommender, recommend
from streams.features import FeatureContext, Featurizer
from streams.schemas import CatalogItem, Click, LineItem, Order


def click(user: str, item: str, t: float, merchant: str = "m1", clicked: bool = True) -> Click:
    return Click(event_id=f"{merchant}{user}{item}{t}", merchant_id=merchant, user_id=user, item_id=item,
                 session_id="s", timestamp=t, position=0, page="home", device="app", clicked=clicked)


def order(user: str, items: list[str], t: float, merchant: str = "m1") -> Order:
    return Order(event_id=f"o{user}{t}", order_id=f"o{user}{t}", merchant_id=merchant, user_id=user, timestamp=t,
                 currency="EUR", items=[LineItem(item_id=i, quantity=1, unit_price=5.0) for i in items])


def test_co_clicked_items_come_first_then_popular_and_merchants_are_separate():
    rec = Recommender()
    t = 1000.0
    for user in "abc":
        for item in ("shoe", "sock"):
            rec.observe(click(user, item, t))
            t += 1
    for user in "defgh":
        rec.observe(click(user, "hat", t))
        t += 1
    rec.observe(click("z", "shoe", t))
    assert rec.candidates("m1", "z", 3)[:2] == ["sock", "hat"]  # co-clicked with shoe, then the most popular
    assert rec.candidates("m2", "z", 3) == []
    rec.observe(click("x", "other", t, merchant="m2"))
    assert rec.candidates("m2", "nobody", 5) == ["other"]


def test_impressions_without_click_do_not_count_and_catalog_fills_cold_start():
    rec = Recommender()
    rec.observe(CatalogItem(event_id="c", merchant_id="m1", item_id="new", category="toys", price=3.0, title="t",
                            timestamp=1.0))
    rec.observe(click("a", "ignored", 2.0, clicked=False))
    assert rec.candidates("m1", "a", 5) == ["new"]


def test_just_bought_items_are_excluded_for_a_while():
    rec = Recommender(exclude_seconds=100.0)
    rec.observe(click("a", "tv", 1.0))
    rec.observe(click("b", "tv", 2.0))
    rec.observe(order("a", ["tv"], 3.0))
    assert rec.exclude("m1", "a") == {"tv"} and "tv" not in rec.candidates("m1", "a", 5)
    assert "tv" in rec.candidates("m1", "b", 5)
    rec.observe(click("b", "radio", 500.0))  # event time moves on past the window
    assert rec.exclude("m1", "a") == set() and "tv" in rec.candidates("m1", "a", 5)


def test_memory_stays_bounded_and_popularity_decays():
    rec = Recommender(max_items=50, max_neighbors=5, max_users=20, history=3, half_life_s=10.0)
    rng = np.random.default_rng(3)
    for t in range(5000):
        rec.observe(click(f"u{rng.integers(500)}", f"i{rng.integers(1000)}", float(t)))
    size = rec.size()
    assert size["items"] <= 100 and size["users"] <= 20
    assert all(len(row) <= 10 for m in rec.merchants.values() for row in m.neighbors.values())
    recent = Recommender(half_life_s=10.0)
    for t in range(10):
        recent.observe(click("u", "old", float(t)))
    for t in range(3):
        recent.observe(click("v", "new", 1000.0 + t))  # 3 fresh clicks outweigh 10 stale ones
    assert recent.popular("m1", 2) == ["new", "old"]
    clone = pickle.loads(pickle.dumps(rec))
    assert clone.candidates("m1", "u1", 5) == rec.candidates("m1", "u1", 5)


def test_recommend_ranks_candidates_with_the_click_model():
    featurizer, context, rec = Featurizer(10), FeatureContext(), Recommender()
    model = FTRLProximalClassifier(bits=10, alpha=0.5, l2=0.0)
    for item in ("good", "bad"):
        context.set_item("m1", item, "cat", 10.0)
        rec.observe(click("u", item, 1.0))
    for _ in range(30):
        for item, label in (("good", True), ("bad", False)):
            indices, values = featurizer.candidates("m1", "v", [item], context, timestamp=5.0)
            model.learn_many(indices, values, [label])
    ranked = recommend(model, featurizer, context, "m1", "v", 2, recommender=rec, timestamp=5.0)
    assert [item for item, _ in ranked] == ["good", "bad"] and ranked[0][1] > 0.7 > 0.3 > ranked[1][1]
    assert rec.recommend(model, featurizer, context, "m1", "v", 1, timestamp=5.0) == ranked[:1]
    with pytest.raises(ValueError):
        recommend(model, featurizer, context, "m1", "v", 0, recommender=rec)
    with pytest.raises(ValueError):
        rec.candidates("m1", "v", 0)


def test_auc_and_calibration_against_hand_computed_values():
    y = np.array([1, 0, 1, 0, 1])
    p = np.array([0.9, 0.3, 0.3, 0.1, 0.8])
    # positive/negative pairs: (0.9>0.3, 0.9>0.1, 0.3=0.3 -> 1/2, 0.3>0.1, 0.8>0.3, 0.8>0.1) = 5.5/6
    assert roc_auc(y, p) == pytest.approx(5.5 / 6)
    assert math.isnan(roc_auc(np.ones(3), p[:3]))
    table, ece = reliability(y, p, bins=2)
    # bin [0, .5): p=.3,.3,.1 mean .2333, rate 1/3; bin [.5, 1]: p=.9,.8 mean .85, rate 1
    assert ece == pytest.approx(3 / 5 * abs(0.7 / 3 - 1 / 3) + 2 / 5 * abs(0.85 - 1.0))
    assert [row["count"] for row in table] == [3, 2]


def test_evaluator_per_merchant_windows_rankings_and_error_stream():
    evaluator = PrequentialEvaluator(window=4, bins=5)
    seen = []
    evaluator.subscribe(seen.append)
    evaluator.update_many(["a", "b", "a", "a", "a", "a"], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                          [True, False, False, True, False, True], [0.8, 0.1, 0.6, 0.7, 0.2, 0.9])
    assert len(seen) == 6 and seen[1] == ("b", 2.0, False, 0.1)
    report = evaluator.report("a")
    assert report["events"] == 5 and report["window_events"] == 4
    assert report["rolling_auc"] == pytest.approx(1.0)  # last 4 of "a": (0,.6) (1,.7) (0,.2) (1,.9)
    expected = -np.mean(np.log([0.8, 0.4, 0.7, 0.8, 0.9]))
    assert report["logloss"] == pytest.approx(expected)
    evaluator.observe_ranking("a", ["x", "y", "z"], "z", k=2)  # miss in the top 2
    evaluator.observe_ranking("a", ["z", "y"], "z", k=2)  # hit at rank 1
    assert evaluator.report()["hit_rate@2"] == 0.5 and evaluator.report()["ndcg@2"] == 0.5
    summary = evaluator.summary()
    assert "hit_rate_at_2" in summary and summary["prequential_logloss"] == evaluator.report()["rolling_logloss"]
    assert pickle.loads(pickle.dumps(evaluator)).report() == evaluator.report()
    with pytest.raises(ValueError):
        evaluator.update("a", 7.0, True, 1.5)
    with pytest.raises(KeyError):
        evaluator.report("nobody")


def test_popularity_ranking_equals_nlargest_with_ties_in_insertion_order():
    import heapq
    import random

    from online.candidates import top_keys

    rng = random.Random(1)
    for _ in range(200):
        counts = {f"k{i}": rng.choice([rng.random(), 1.0, 2.0, round(rng.random(), 1)]) for i in range(rng.randint(0, 1500))}
        depth = rng.randint(1, 600)
        assert top_keys(counts, depth) == [k for k, _ in heapq.nlargest(depth, counts.items(), key=lambda kv: kv[1])]
