"""ModelBundle: exact fast candidate features, learned ranking, exclusions, pickling, and the pyfunc flavor.

Also home of :func:`make_bundle`, a small seeded bundle from a really trained model, which the registry
and serving tests reuse.
"""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from fedstream.metrics import roc_auc
from registry.bundle import LinearScorer, ModelBundle
from streams.features import FeatureContext, Featurizer
from streams.schemas import CatalogItem, Click, InvalidEvent, LineItem, Order

BITS = 16
CATEGORIES = ("shoes", "bags", "hats", "socks", "belts")
T0 = 1_700_000_000.0


def make_catalog(merchants=("m1", "m2"), items: int = 200, seed: int = 7) -> tuple[FeatureContext, list[CatalogItem]]:
    rng = np.random.default_rng(seed)
    context, events = FeatureContext(), []
    for merchant in merchants:
        for k in range(items):
            event = CatalogItem(event_id=f"c-{merchant}-{k}", merchant_id=merchant, item_id=f"{merchant}-i{k}",
                                category=CATEGORIES[k % len(CATEGORIES)], price=float(rng.uniform(5, 300)),
                                title=f"item {k}", timestamp=T0)
            context.observe(event)
            events.append(event)
    return context, events


def preferred_category(user: str) -> str:
    return CATEGORIES[int(user[1:]) % len(CATEGORIES)]


def make_clicks(n: int, merchants=("m1", "m2"), items: int = 200, users: int = 40, seed: int = 11) -> list[Click]:
    """Impressions whose label follows the user's preferred category (60% vs 8% click rate)."""
    rng = np.random.default_rng(seed)
    clicks = []
    for e in range(n):
        merchant, user, k = merchants[e % len(merchants)], f"u{rng.integers(users)}", int(rng.integers(items))
        liked = CATEGORIES[k % len(CATEGORIES)] == preferred_category(user)
        clicks.append(Click(event_id=f"e{e}", merchant_id=merchant, user_id=user, item_id=f"{merchant}-i{k}",
                            session_id=f"s{e // 10}", timestamp=T0 + e, position=int(rng.integers(10)),
                            page="category", device="mobile", clicked=bool(rng.random() < (0.6 if liked else 0.08))))
    return clicks


def train_scorer(clicks: list[Click], context: FeatureContext, epochs: int = 3, bits: int = BITS) -> LinearScorer:
    featurizer, scorer = Featurizer(bits), LinearScorer(bits=bits, learning_rate=0.2)
    indices, values = featurizer.transform_many(clicks, context)
    labels = np.array([c.clicked for c in clicks], dtype=np.float32)
    for _ in range(epochs):
        for start in range(0, len(clicks), 64):
            scorer.learn_many(indices[start:start + 64], values[start:start + 64], labels[start:start + 64])
    return scorer


class RecentPurchases:
    """A tiny real recommender (duck-typed like online.reco.Recommender): popular items minus just-bought."""

    def __init__(self) -> None:
        self.popular: dict[str, Counter] = {}
        self.bought: dict[tuple[str, str], set[str]] = {}

    def observe(self, event) -> None:
        if isinstance(event, Click) and event.clicked:
            self.popular.setdefault(event.merchant_id, Counter())[event.item_id] += 1
        elif isinstance(event, Order):
            self.bought.setdefault((event.merchant_id, event.user_id), set()).update(i.item_id for i in event.items)

    def candidates(self, merchant_id: str, user_id: str, limit: int) -> list[str]:
        return [item for item, _ in self.popular.get(merchant_id, Counter()).most_common(limit)]

    def exclude(self, merchant_id: str, user_id: str) -> set[str]:
        return set(self.bought.get((merchant_id, user_id), ()))


_CACHE: dict[str, tuple] = {}


def make_bundle(description: str = "seeded logistic", *, scale: float = 1.0, recommender=None) -> ModelBundle:
    """A bundle with a really trained logistic scorer (training cached per session; weights scaled)."""
    if "trained" not in _CACHE:
        context, _ = make_catalog()
        clicks = make_clicks(6000)
        _CACHE["trained"] = (context, train_scorer(clicks, context))
    context, scorer = _CACHE["trained"]
    model = LinearScorer(bits=BITS, weights=scorer.weights * scale, bias=scorer.bias * scale)
    return ModelBundle(model=model, feature_bits=BITS, context=context, recommender=recommender,
                       kind="online", description=description, meta={"learner": "LinearScorer"})


def click_frame(clicks: list[Click]) -> pd.DataFrame:
    import msgspec

    return pd.DataFrame([{k: v for k, v in msgspec.to_builtins(c).items() if k != "type"} for c in clicks])


def test_fast_candidate_features_equal_the_featurizer_exactly():
    context, _ = make_catalog(items=300)
    context.merchant("m1").remember("u3", "hats")
    bundle = ModelBundle(model=LinearScorer(bits=BITS), feature_bits=BITS, context=context)
    for user in ("u3", "u-new", "a-much-longer-user-identifier-ü"):
        items, fast = bundle.candidate_features("m1", user, T0 + 3600 * 7)
        reference, _ = Featurizer(BITS).candidates("m1", user, items, context, timestamp=T0 + 3600 * 7)
        assert len(items) == 300
        np.testing.assert_array_equal(fast, reference)


def test_recommender_candidates_include_items_missing_from_the_catalog():
    context, _ = make_catalog(items=50)
    reco = RecentPurchases()
    reco.popular["m1"] = Counter({"m1-i3": 5, "never-announced": 4, "m1-i7": 1})
    bundle = ModelBundle(model=LinearScorer(bits=BITS), feature_bits=BITS, context=context, recommender=reco)
    items, fast = bundle.candidate_features("m1", "u1", T0)
    reference, _ = Featurizer(BITS).candidates("m1", "u1", items, context, timestamp=T0)
    assert sorted(items) == ["m1-i3", "m1-i7", "never-announced"]
    np.testing.assert_array_equal(fast, reference)


def test_trained_bundle_predicts_clicks_and_ranks_the_users_preferred_category_first():
    bundle = make_bundle()
    held_out = make_clicks(2000, seed=99)
    p = bundle.predict(held_out)
    assert p.shape == (2000,) and np.all((p > 0) & (p < 1))
    assert roc_auc(np.array([c.clicked for c in held_out], dtype=float), p) > 0.72  # the Bayes-optimal AUC of this stream is 0.78
    for user in ("u0", "u1", "u7"):
        top = bundle.recommend("m1", user, k=10, timestamp=T0)
        assert len(top) == 10 and [s for _, s in top] == sorted((s for _, s in top), reverse=True)
        liked = sum(bundle.context.item("m1", item).category == preferred_category(user) for item, _ in top)
        assert liked >= 8, (user, top)


def test_just_bought_items_are_excluded_and_bad_arguments_are_refused():
    reco = RecentPurchases()
    for click in make_clicks(500):
        reco.observe(click)
    bundle = make_bundle(recommender=reco)
    before = [item for item, _ in bundle.recommend("m1", "u2", k=5, timestamp=T0)]
    reco.observe(Order(event_id="o", order_id="o1", merchant_id="m1", user_id="u2", timestamp=T0, currency="EUR",
                       items=[LineItem(item_id=before[0], quantity=1, unit_price=10.0)]))
    after = [item for item, _ in bundle.recommend("m1", "u2", k=5, timestamp=T0)]
    assert before[0] not in after and after[:4] == before[1:]
    assert bundle.recommend("no-such-merchant", "u2", k=5) == []
    with pytest.raises(ValueError, match="k must be"):
        bundle.recommend("m1", "u2", k=0)
    with pytest.raises(TypeError, match="predict_proba_many"):
        ModelBundle(model=object(), feature_bits=BITS, context=FeatureContext())
    with pytest.raises(ValueError, match="kind"):
        ModelBundle(model=LinearScorer(bits=8), feature_bits=8, context=FeatureContext(), kind="batch")


def test_pickled_bundle_drops_its_cache_and_ranks_identically():
    bundle = make_bundle()
    first = bundle.recommend("m2", "u4", k=10, timestamp=T0)
    copy = pickle.loads(pickle.dumps(bundle))
    assert copy.recommend("m2", "u4", k=10, timestamp=T0) == first
    bundle.context.set_item("m2", "brand-new", category="hats", price=20.0)
    assert "brand-new" in bundle.candidate_features("m2", "u4", T0)[0]  # cache follows catalog growth
    del bundle.context.merchant("m2").catalog["brand-new"]


def test_pyfunc_flavor_saves_and_loads_a_bundle_that_predicts_from_a_dataframe(tmp_path):
    import mlflow.pyfunc

    from registry.flavor import save
    from registry.signing import trusting

    bundle = make_bundle()
    clicks = make_clicks(50, seed=5)
    save(bundle, tmp_path / "model", b"k" * 32)
    with trusting(b"k" * 32):
        loaded = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    np.testing.assert_allclose(loaded.predict(click_frame(clicks)), bundle.predict(clicks), rtol=1e-6)
    assert loaded.unwrap_python_model().bundle.description == "seeded logistic"
    bad = click_frame(clicks[:2]).assign(position=[1, -3])
    with pytest.raises(InvalidEvent, match="row 1") as caught:
        loaded.predict(bad)
    assert caught.value.reason == "out_of_range"


class OpaqueScorer:
    """The same model without ``linear_terms``: forces the generic (n, F) ranking path."""

    def __init__(self, model) -> None:
        self.model = model

    def predict_proba_many(self, indices, values):
        return self.model.predict_proba_many(indices, values)


def test_linear_fast_path_ranks_exactly_like_the_generic_path():
    reco = RecentPurchases()
    for click in make_clicks(800):
        reco.observe(click)
    reco.popular["m1"]["never-announced"] = 100
    for recommender in (None, reco):
        fast = make_bundle(recommender=recommender)
        generic = ModelBundle(model=OpaqueScorer(fast.model), feature_bits=BITS, context=fast.context,
                              recommender=recommender)
        for user in ("u1", "u5", "stranger"):
            a = fast.recommend("m1", user, k=20, timestamp=T0)
            b = generic.recommend("m1", user, k=20, timestamp=T0)
            assert [item for item, _ in a] == [item for item, _ in b]
            np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-5)


def test_a_version_pickled_before_ranking_moved_to_online_still_loads_and_ranks_the_same():
    """Pickled by the code before online.click_ranking existed (registry.bundle.ModelBundle, LinearScorer,
    online.reco.Recommender); the rankings below are what that code returned for it."""
    from pathlib import Path

    blob = (Path(__file__).parent / "data" / "bundle_pickled_before_click_ranking.pkl").read_bytes()
    bundle = pickle.loads(blob)
    assert type(bundle) is ModelBundle and type(bundle.model) is LinearScorer
    top = bundle.recommend("m1", "u3", k=5, timestamp=1.7e9 + 500)
    assert [item for item, _ in top] == ["i25", "i13", "i1", "i3", "i21"]
    np.testing.assert_allclose([s for _, s in top], [0.904985650, 0.876476508, 0.861292060, 0.851266611, 0.841645146],
                               rtol=1e-7)
    assert [item for item, _ in bundle.recommend("m1", "u3", k=3, timestamp=1.7e9 + 500, item_id="i25")] == [
        "i13", "i1", "i3"]
    # the learner worker's evaluation ranks the same way (online.reco.recommend: uncached, the same ClickRanker)
    from online.reco import recommend

    evaluated = recommend(bundle.model, Featurizer(10), bundle.context, "m1", "u3", 5, recommender=bundle.recommender,
                          timestamp=1.7e9 + 500, candidate_limit=bundle.candidate_limit)
    assert [item for item, _ in evaluated] == [item for item, _ in top]
    np.testing.assert_allclose([s for _, s in evaluated], [s for _, s in top], rtol=1e-5)
