"""Two-stage recommender: candidate sources, learned repeat behaviour, product pages, bounds, pickling."""

from __future__ import annotations

import pickle
import random

from online.candidates import CandidateState
from online.ranking import ShopRecommender
from registry.bundle import LinearScorer, ModelBundle
from streams.features import FeatureContext
from streams.schemas import CatalogItem, LineItem, Order

DAY = 86_400.0


def order(merchant: str, user: str, items: list[str], when: float, n: int) -> Order:
    return Order(event_id=f"o{n}", order_id=f"o{n}", merchant_id=merchant, user_id=user, timestamp=when,
                 currency="EUR", items=[LineItem(item_id=i, quantity=1, unit_price=1.0) for i in items])


def shop_stream(seed: int = 3) -> list[Order]:
    """Two merchants over 40 days. ``pantry``: each user re-buys their own staple every 3 days and adds a
    random popular item; ``cinema``: each user watches a new film every day, never the same twice."""
    rng, events = random.Random(seed), []
    films = [f"film{k}" for k in range(400)]
    for u in range(30):
        staple, start = f"staple{u % 10}", rng.uniform(0, 3 * DAY)
        for visit in range(13):
            events.append(("pantry", f"p{u}", [staple, f"snack{rng.randrange(5)}"], start + visit * 3 * DAY))
        seen = rng.sample(films, 40)
        for day, film in enumerate(seen):
            events.append(("cinema", f"c{u}", [film], rng.uniform(0, 0.5 * DAY) + day * DAY))
    events.sort(key=lambda e: e[3])
    return [order(m, u, items, t, n) for n, (m, u, items, t) in enumerate(events)]


def trained(events, **options) -> ShopRecommender:
    rec = ShopRecommender(seed=1, **options)
    for event in events:
        rec.observe(event)
    return rec


def test_rebuying_is_learned_per_merchant_not_a_fixed_exclusion():
    events = shop_stream()
    rec = trained(events)
    last = {(e.merchant_id, e.user_id): e for e in events}
    pantry_hits = cinema_repeats = 0
    for (merchant, user), event in last.items():
        top = rec.rank(merchant, user, 10, timestamp=event.timestamp + 3 * DAY)
        if merchant == "pantry":
            staple = event.items[0].item_id
            pantry_hits += top[0].item_id == staple and top[0].source == "history"
        else:
            seen = {e.items[0].item_id for e in events if e.user_id == user}
            cinema_repeats += sum(r.item_id in seen for r in top)
    assert pantry_hits == 30  # the staple, due again, comes first for every pantry user
    assert cinema_repeats == 0  # nobody is offered a film they already watched
    assert rec.state.shops["pantry"].totals.repeats > 0.4 * rec.state.shops["pantry"].totals.count
    assert rec.state.shops["cinema"].totals.repeats == 0


def test_an_item_is_offered_again_when_it_is_due_by_its_learned_cycle():
    """Users buy coffee every 2 days and detergent every 6: the ranker learns from the repeat gaps that
    detergent bought 2 days ago is not due yet (coffee is), and that it is due 6 days after."""
    rng, events, n = random.Random(4), [], 0
    for u in range(25):
        start = rng.uniform(0, DAY)
        for visit in range(15):
            items = ["coffee"] + (["detergent"] if visit % 3 == 0 else []) + [f"extra{rng.randrange(30)}"]
            events.append(order("shop", f"u{u}", items, start + visit * 2 * DAY + rng.uniform(-0.1, 0.1) * DAY, n))
            n += 1
    events.sort(key=lambda e: e.timestamp)
    rec = trained(events, train_every=1)  # 375 steps: learn from each (the default samples after 200)
    last = max(e.timestamp for e in events if e.user_id == "u0")  # visit 14: coffee, no detergent (bought at 12)
    not_due = {r.item_id: r.score for r in rec.rank("shop", "u0", 30, timestamp=last + 2 * DAY)}
    due = {r.item_id: r.score for r in rec.rank("shop", "u0", 30, timestamp=last + 4 * DAY)}
    assert max(not_due, key=not_due.get) == "coffee" and not_due["coffee"] > not_due["detergent"]
    assert due["detergent"] > not_due["detergent"]


def test_product_page_shows_items_bought_together():
    """Each user buys one pair in one basket, then single gifts: the pair's items co-occur only inside
    that basket (items of the same order were not linked before: the page showed the later gifts)."""
    events, n = [], 0
    for u in range(40):
        pair = [("tent", "pegs"), ("kettle", "tea"), ("ball", "pump")][u % 3]
        events.append(order("m1", f"u{u}", list(pair), u * 60.0, n))
        for day in range(1, 4):
            events.append(order("m1", f"u{u}", [f"gift{(u * 7 + day) % 11}"], day * DAY + u * 60.0, n + day))
        n += 4
    rec = trained(sorted(events, key=lambda e: e.timestamp), train_every=1)  # 160 steps: learn from each
    page = rec.rank("m1", "new-user", 3, item_id="tent")
    assert page[0].item_id == "pegs" and page[0].source in ("co-occurrence", "transition")
    assert "tent" not in [r.item_id for r in page]


def test_cold_start_comes_from_the_catalog_and_popularity():
    rec = ShopRecommender()
    for k in range(5):
        rec.observe(CatalogItem(event_id=f"c{k}", merchant_id="m1", item_id=f"i{k}", category="a", price=1.0,
                                title="t", timestamp=0.0))
    assert [r.source for r in rec.rank("m1", "u", 5)] == ["catalog"] * 5
    rec.observe(order("m1", "a", ["i3"], 10.0, 1))
    ranked = rec.rank("m1", "nobody", 5)
    assert ranked[0].item_id == "i3" and ranked[0].source == "popular" and len(ranked) == 5
    assert rec.rank("unknown", "u", 5) == []


def test_state_is_bounded_and_pickles_to_the_same_rankings():
    state = CandidateState(max_items=30, max_neighbors=5, max_users=20, max_user_items=4, history=3)
    rec, rng = ShopRecommender(candidates=state, seed=2), random.Random(5)
    for n in range(3000):
        rec.observe(order("m1", f"u{rng.randrange(100)}", [f"i{rng.randrange(200)}" for _ in range(2)], n * 60.0, n))
    shop = rec.state.shops["m1"]
    assert len(shop.users) <= 20 and all(len(u.items) <= 8 for u in shop.users.values())
    rows = (*shop.co.as_dict().values(), *shop.trans.as_dict().values())
    assert len(shop.stats) <= 60 and all(len(row) <= 10 for row in rows)
    clone = pickle.loads(pickle.dumps(rec))
    for user in list(shop.users)[:5]:
        assert [(r.item_id, r.score) for r in clone.rank("m1", user, 10)] == [(r.item_id, r.score) for r in rec.rank("m1", user, 10)]
    clone.observe(order("m1", "u1", ["i1"], 3000 * 60.0, 9999))
    rec.observe(order("m1", "u1", ["i1"], 3000 * 60.0, 9999))
    assert clone.ranker.weights.tolist() == rec.ranker.weights.tolist()  # the sampler state travels too


def test_the_bundle_serves_the_two_stage_ranking_with_sources():
    rec = trained(shop_stream())
    bundle = ModelBundle(model=LinearScorer(bits=10), feature_bits=10, context=FeatureContext(), recommender=rec)
    loaded = pickle.loads(pickle.dumps(bundle))
    items = loaded.recommend_items("pantry", "p1", 5)
    assert [(r.item_id, r.source) for r in items] == [(r.item_id, r.source) for r in rec.rank("pantry", "p1", 5)]
    assert loaded.recommend("pantry", "p1", 5) == [(r.item_id, r.score) for r in items]
    assert loaded.merchants() == ["cinema", "pantry"]


def test_cold_start_items_come_by_text_similarity_embedded_once_off_the_request_path():
    """New catalog items nobody chose: the ones whose text is closest to the user's recent items come first."""
    state = CandidateState(text=True, text_batch=4)
    catalog = [("old-dog", "Grain-free dog food for puppies", "pet"), ("old-tv", "4K television 55 inch", "electronics"),
               ("new-cable", "HDMI cable 2 m", "electronics"), ("new-leash", "Retractable dog leash", "pet"),
               ("new-kibble", "Puppy kibble, chicken", "pet"), ("new-phone", "Android smartphone 128 GB", "phones")]
    for k, (item, title, category) in enumerate(catalog):
        state.observe(CatalogItem(event_id=f"c{k}", merchant_id="m1", item_id=item, category=category, price=5.0,
                                  title=title, timestamp=0.0))
    shop = state.shops["m1"]
    assert len(shop.text_items) == 4 and len(shop.pending) == 2  # one batch of 4 embedded, 2 waiting
    state.observe(order("m1", "dog-owner", ["old-dog"], 10.0, 1))
    state.observe(order("m1", "viewer", ["old-tv"], 10.0, 2))
    before = state.cold_start(shop, shop.users["dog-owner"], 4)
    assert before[:2] == ["new-leash", "new-cable"]  # embedded first (pet before cable), the waiting two after
    assert sorted(before[2:]) == ["new-kibble", "new-phone"] and len(shop.pending) == 2  # proposing embeds nothing
    assert state.embed_pending() == 2 and state.embed_pending() == 0  # each item once
    dog = state.cold_start(shop, shop.users["dog-owner"], 4)
    viewer = state.cold_start(shop, shop.users["viewer"], 4)
    assert set(dog[:2]) == {"new-kibble", "new-leash"} and set(viewer[:2]) == {"new-cable", "new-phone"}
    proposed, _, _ = state.propose("m1", "dog-owner", limit=6)
    assert set(dog) == {i for i, mask in proposed.items() if mask == 16}  # the catalog source, in that order
    state.observe(order("m1", "someone", ["new-kibble"], 20.0, 3))  # chosen: no longer a cold-start item
    assert "new-kibble" not in state.cold_start(shop, shop.users["dog-owner"], 4)
    clone = pickle.loads(pickle.dumps(state))
    assert clone.encoder is None and clone.cold_start(clone.shops["m1"], clone.shops["m1"].users["dog-owner"], 3) == \
        state.cold_start(shop, shop.users["dog-owner"], 3)
