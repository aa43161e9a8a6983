"""The worker's batch path learns exactly what the event-by-event reference learns.

The reference is the code the batch path replaced: ``Featurizer.slots_for`` then ``FeatureContext.observe``
per event, the recommender fed event by event with its ranking samples, and the model learning the block;
and the ranker's features as first written (a numpy row filled cell by cell).
"""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.settings import load_settings
from online.river_models import make_model
from online.worker import LearnerState, OnlineWorker, WorkerConfig
from streams.consumer import Record
from streams.features import FeatureContext, Featurizer
from streams.generator import GeneratorConfig, generate
from streams.schemas import CatalogItem, Click, LineItem, Order

BITS = 16


def reference_rows(featurizer: Featurizer, events: list, context: FeatureContext) -> tuple[np.ndarray, list[int]]:
    rows, at = [], []
    for position, event in enumerate(events):
        if type(event) is Click:
            rows.append(featurizer.slots_for(event.merchant_id, event.user_id, event.item_id, event.timestamp,
                                             event.device, event.page, event.position, context))
            at.append(position)
        context.observe(event)
    return np.array(rows, dtype=np.int32).reshape(len(rows), featurizer.n_fields), at


def catalog_changes() -> list:
    """An item clicked unknown, then catalogued, then re-catalogued (new category and price), then ordered."""
    def click(item: str, ts: float, clicked: bool = True) -> Click:
        return Click(event_id=f"c{ts}", merchant_id="m1", user_id="u1", item_id=item, session_id="s", timestamp=ts,
                     position=3, page="search", device="app", clicked=clicked)

    def catalog(item: str, category: str, price: float) -> CatalogItem:
        return CatalogItem(event_id=f"k{item}{category}", merchant_id="m1", item_id=item, category=category, price=price,
                           title=item, timestamp=1.7e9)

    order = Order(event_id="o1", order_id="o1", merchant_id="m1", user_id="u1", timestamp=1.7e9 + 9, currency="EUR",
                  items=[LineItem(item_id="i2", quantity=1, unit_price=30.0)])
    return [click("i1", 1.7e9), catalog("i1", "shoes", 50.0), click("i1", 1.7e9 + 1, False),
            catalog("i1", "boots", 90.0), click("i1", 1.7e9 + 2), order, click("i2", 1.7e9 + 10), click("i1", 1.7e9 + 11)]


@pytest.mark.parametrize("block", [1, 37, 256])
def test_featurize_block_gives_the_reference_slots_and_context(block):
    events = catalog_changes() + list(generate(GeneratorConfig(merchants=3, events=4000, seed=5)))
    batch, reference = Featurizer(BITS), Featurizer(BITS)
    batch_context, reference_context = FeatureContext(), FeatureContext()
    for start in range(0, len(events), block):
        part = events[start:start + block]
        got, got_at = batch.featurize_block(part, batch_context)
        want, want_at = reference_rows(reference, part, reference_context)
        assert got_at == want_at
        assert got.dtype == np.int32 and np.array_equal(got, want)
    assert batch_context.state() == reference_context.state()


def test_featurize_block_memo_follows_a_context_restored_from_a_checkpoint():
    featurizer, events = Featurizer(BITS), catalog_changes()
    context = FeatureContext()
    featurizer.featurize_block(events[:4], context)
    restored = FeatureContext.from_state(context.state())  # new ItemInfo objects: the item memo must not be trusted
    restored.set_item("m1", "i1", "sandals", 20.0)
    got, _ = featurizer.featurize_block(events[4:], restored)
    want, _ = reference_rows(Featurizer(BITS), events[4:], FeatureContext.from_state(
        {**context.state(), "merchants": {"m1": {**context.state()["merchants"]["m1"],
                                                 "catalog": {"i1": ("sandals", 20.0)}}}}))
    assert np.array_equal(got, want)


def reference_learn(events: list, block: int, rank_every: int) -> tuple:
    """The event-by-event worker: what ``OnlineWorker.learn_block`` did before the batch path."""
    state = LearnerState(make_model("ftrl", BITS), BITS, "ftrl")
    featurizer, ranked = Featurizer(BITS), 0
    for start in range(0, len(events), block):
        rows, labels, merchants, stamps = [], [], [], []
        for event in events[start:start + block]:
            if type(event) is Click:
                rows.append(featurizer.slots_for(event.merchant_id, event.user_id, event.item_id, event.timestamp,
                                                 event.device, event.page, event.position, state.context))
                labels.append(event.clicked)
                merchants.append(event.merchant_id)
                stamps.append(event.timestamp)
            if (type(event) is Click and event.clicked) or type(event) is Order:
                ranked += 1
                if ranked % rank_every == 0:
                    actual = event.item_id if type(event) is Click else event.items[0].item_id
                    shown = [r.item_id for r in state.recommender.rank(event.merchant_id, event.user_id, 10,
                                                                       timestamp=event.timestamp)]
                    state.evaluator.observe_ranking(event.merchant_id, shown, actual, 10)
            state.context.observe(event)
            state.recommender.observe(event)
        if rows:
            indices = np.array(rows, dtype=np.int32)
            y = np.array(labels, dtype=bool)
            p = state.model.learn_many(indices, np.ones(indices.shape, dtype=np.float32), y)
            state.evaluator.update_many(merchants, stamps, y, p)
    return state


def test_worker_blocks_learn_what_the_event_by_event_reference_learns(tmp_path):
    events = catalog_changes() + list(generate(GeneratorConfig(merchants=3, events=3000, seed=11)))
    settings = load_settings(data_dir=tmp_path, feature_bits=BITS)
    config = WorkerConfig(model="ftrl", checkpoint_path=tmp_path / "w.ckpt", block=64, rank_every=7,
                          publish_every_s=None, publish_at_end=False)
    worker = OnlineWorker(settings, config)
    records = [Record(event, "events", 0, offset, None, None) for offset, event in enumerate(events)]
    for start in range(0, len(records), 64):
        worker.learn_block(records[start:start + 64])
    want = reference_learn(events, 64, 7)
    got = worker.state
    for name in ("w", "z", "n"):
        assert np.array_equal(getattr(got.model, name), getattr(want.model, name)), name
    assert np.array_equal(got.recommender.ranker.weights, want.recommender.ranker.weights)
    assert got.context.state() == want.context.state()
    assert got.evaluator.report() == want.evaluator.report()
    assert got.evaluator.report()["rankings@10"] > 50


def reference_features(shop, user, items, masks, co, trans, when) -> np.ndarray:
    """The ranker's features as first written: one numpy row filled cell by cell."""
    import math

    from online.candidates import CATALOG, COOCCUR, HISTORY, POPULAR, TRANSITION
    from online.ranking import FEATURES

    out = np.zeros((len(items), len(FEATURES)))
    co_max, trans_max = max(co.values(), default=0.0) or 1.0, max(trans.values(), default=0.0) or 1.0
    pop_max = max((shop.popularity.get(shop.ranked[0], 0.0) if shop.ranked else 0.0), 1e-300)
    merchant_repeat = (shop.totals.repeats + 0.1) / (shop.totals.count + 1.0)
    user_items, user_total = (user.items, user.total) if user is not None else ({}, 0)
    for row, (item, mask) in enumerate(zip(items, masks)):
        x = out[row]
        x[0] = 1.0
        x[7] = repeat = shop.repeat_rate(item)
        entry = user_items.get(item)
        if entry is not None:
            gap = max(when - entry[2], 1.0)
            mean, sd = shop.gap_model(item)
            z = (math.log(gap) - mean) / sd
            x[1:7] = (math.log1p(entry[0]), 1.0, math.log1p(entry[1]), math.log1p(gap / 3600.0) / 5.0,
                      math.exp(-gap / 86_400.0), math.exp(-0.5 * z * z))
            x[8], x[9] = repeat, merchant_repeat
        c, t = co.get(item, 0.0), trans.get(item, 0.0)
        x[10:14] = (math.log1p(10.0 * c), c / co_max, math.log1p(10.0 * t), t / trans_max)
        x[14] = math.log(shop.popularity.get(item, 0.0) / pop_max + 1e-4) / 9.2 + 1.0
        stats = shop.stats.get(item)
        x[15] = math.log1p(stats.count) / 10.0 if stats is not None else 0.0
        category = shop.catalog.get(item)
        if category is not None and user_total:
            x[16] = user.categories.get(category, 0) / user_total
        x[17:22] = (mask & HISTORY and 1, mask & COOCCUR and 1, mask & TRANSITION and 1, mask & POPULAR and 1,
                    mask & CATALOG and 1)
    return out


def test_ranker_features_equal_the_cell_by_cell_reference():
    from online.ranking import ShopRecommender, features

    recommender = ShopRecommender()
    events = list(generate(GeneratorConfig(merchants=2, events=3000, seed=4)))
    for event in events:
        recommender.observe(event)
    checked = 0
    for event in events[::40]:
        if type(event) is not Click:
            continue
        shop = recommender.state.shops[event.merchant_id]
        proposed, co, trans = recommender.state.propose(event.merchant_id, event.user_id, 150)
        items = list(proposed)
        args = (shop, shop.users.get(event.user_id), items, [proposed[i] for i in items], co, trans,
                event.timestamp + 3600.0)
        got, want = features(*args), reference_features(*args)
        assert got.shape == want.shape and np.array_equal(got, want)
        checked += len(items) * (shop.users.get(event.user_id) is not None)
    assert checked > 500  # users with a history were among the rows compared
