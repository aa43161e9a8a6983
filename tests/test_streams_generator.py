"""The synthetic traffic generator: contract, determinism, realism, learnability and drift."""

from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pytest

from fedstream.metrics import mean_logloss, roc_auc
from streams.features import FeatureContext, Featurizer
from streams.generator import DriftSpec, GeneratorConfig, generate, ground_truth, merchant_ids
from streams.schemas import CatalogItem, Click, Order, decode_event, encode_event

SMALL = GeneratorConfig(merchants=6, events=20_000, seed=11)


def stream(config):
    return [e for e in generate(config) if not isinstance(e, CatalogItem)]


def test_contract_counts_order_and_catalog_first():
    events = list(generate(SMALL))
    first_other = next(i for i, e in enumerate(events) if not isinstance(e, CatalogItem))
    assert first_other > 0 and all(isinstance(e, CatalogItem) for e in events[:first_other])
    rest = events[first_other:]
    assert len(rest) == SMALL.events and not any(isinstance(e, CatalogItem) for e in rest)
    times = [e.timestamp for e in rest]
    assert times == sorted(times)
    assert {e.merchant_id for e in events} == set(merchant_ids(SMALL)) == {f"m0{k}" for k in range(6)}
    assert len({e.event_id for e in events}) == len(events)
    for event in events[:50] + rest[:2000]:  # every event passes our own validation
        assert decode_event(encode_event(event), now=2e9) == event


def test_seeded_and_deterministic():
    a, b = stream(SMALL), stream(GeneratorConfig(merchants=6, events=20_000, seed=11))
    assert [encode_event(e) for e in a] == [encode_event(e) for e in b]
    c = stream(GeneratorConfig(merchants=6, events=20_000, seed=12))
    assert a[:100] != c[:100]


def test_traffic_looks_like_a_marketplace():
    config = GeneratorConfig(merchants=20, events=100_000, seed=7)
    events = list(generate(config))
    clicks = [e for e in events if isinstance(e, Click)]
    orders = [e for e in events if isinstance(e, Order)]
    per_merchant = Counter(c.merchant_id for c in clicks)
    assert per_merchant["m00"] > 10 * per_merchant["m19"]  # Zipf-like shares
    assert sum(n < 1000 for n in per_merchant.values()) >= 2  # some merchants are small
    ctr = np.mean([c.clicked for c in clicks])
    assert 0.05 < ctr < 0.35
    by_position = [np.mean([c.clicked for c in clicks if c.position == p]) for p in (0, 5)]
    assert by_position[0] > by_position[1]  # position bias
    hours = Counter(time.gmtime(c.timestamp).tm_hour for c in clicks)
    assert hours[20] + hours[21] > 2 * (hours[7] + hours[8])  # evening peak, morning trough
    assert set(Counter(c.device for c in clicks)) == {"desktop", "mobile", "tablet", "app"}
    assert 0.005 < len(orders) / len(clicks) < 0.1
    catalog = {(e.merchant_id, e.item_id): e for e in events if isinstance(e, CatalogItem)}
    for order in orders[:500]:  # bought items exist and cost their catalog price
        for line in order.items:
            assert line.quantity >= 1 and line.unit_price == catalog[(order.merchant_id, line.item_id)].price
    clicked = {(c.session_id, c.item_id) for c in clicks if c.clicked}
    assert all((o.session_id, line.item_id) in clicked for o in orders for line in o.items)  # funnel
    categories = Counter(len({e.category for e in catalog.values() if e.merchant_id == m}) for m in per_merchant)
    assert min(categories) >= 5


def test_drift_changes_nothing_before_it_and_ground_truth_says_where():
    drift = DriftSpec("m01", at_event=12_000, kind="preferences")
    config = GeneratorConfig(merchants=6, events=20_000, seed=11, drifts=(drift,))
    base, drifted = stream(SMALL), stream(config)
    assert base[:12_000] == drifted[:12_000]
    assert base[12_000:] != drifted[12_000:]
    horizon = min(base[-1].timestamp, drifted[-1].timestamp)  # the cut at `events` may move a little
    others = [[e for e in s if e.merchant_id != "m01" and e.timestamp < horizon] for s in (base, drifted)]
    assert others[0] == others[1]  # only the drifting merchant changes
    (truth,) = ground_truth(config)
    assert truth["merchant_id"] == "m01" and truth["at_event"] == 12_000 and truth["kind"] == "preferences"
    assert truth["timestamp"] == drifted[12_000].timestamp
    first = truth["first_merchant_event"]
    assert first >= 12_000 and drifted[first].merchant_id == "m01"
    assert all(e.merchant_id != "m01" for e in drifted[12_000:first])


def test_price_drift_reissues_the_catalog_and_moves_order_prices():
    drift = DriftSpec("m00", at_event=8_000, kind="prices", magnitude=1.0)
    config = GeneratorConfig(merchants=6, events=20_000, seed=11, drifts=(drift,))
    events = list(generate(config))
    counted = [i for i, e in enumerate(events) if not isinstance(e, CatalogItem)]
    at = counted[8_000]
    reissued = [e for e in events[counted[0]:at] if isinstance(e, CatalogItem)]
    assert reissued and {e.merchant_id for e in reissued} == {"m00"}
    assert all(e.timestamp == events[at].timestamp for e in reissued)
    old = {e.item_id: e.price for e in events[: counted[0]] if e.merchant_id == "m00"}
    new = {e.item_id: e.price for e in reissued}
    assert set(new) == set(old)
    assert np.median([new[i] / old[i] for i in old if old[i] > 0]) > 1.15
    after = [o for o in events[at:] if isinstance(o, Order) and o.merchant_id == "m00"]
    assert after and all(line.unit_price == new[line.item_id] for o in after for line in o.items)


def _after(events, at, merchant):
    return [e for e in events[at:] if e.merchant_id == merchant]


def test_device_mix_drift_moves_sessions_to_the_app_and_raises_the_click_rate():
    config = GeneratorConfig(merchants=6, events=20_000, seed=11, drifts=(DriftSpec("m00", 8_000, "device_mix"),))
    base, drifted = stream(SMALL), stream(config)
    assert base[:8_000] == drifted[:8_000]
    before = [e for e in _after(base, 8_000, "m00") if isinstance(e, Click)]
    after = [e for e in _after(drifted, 8_000, "m00") if isinstance(e, Click)]
    assert [e.item_id for e in before] == [e.item_id for e in after]  # same pages and items, other devices
    share = lambda clicks: sum(e.device == "app" for e in clicks) / len(clicks)  # noqa: E731
    assert share(before) < 0.3 < 0.5 < share(after)
    assert np.mean([e.clicked for e in after]) > 1.1 * np.mean([e.clicked for e in before])


def test_popular_item_drift_adds_a_catalog_item_that_takes_impressions_and_orders():
    config = GeneratorConfig(merchants=6, events=20_000, seed=11,
                             drifts=(DriftSpec("m01", 8_000, "popular_item", magnitude=0.5),))
    events = list(generate(config))
    counted = [i for i, e in enumerate(events) if not isinstance(e, CatalogItem)]
    initial = {e.item_id for e in events[: counted[0]] if e.merchant_id == "m01"}
    (new,) = [e for e in events[counted[0]:] if isinstance(e, CatalogItem)]
    assert new.merchant_id == "m01" and new.item_id not in initial and new.timestamp == events[counted[8_000]].timestamp
    clicks = [e for e in _after(events, counted[8_000], "m01") if isinstance(e, Click)]
    shown = sum(e.item_id == new.item_id for e in clicks) / len(clicks)
    assert 0.1 < shown < 0.2  # 0.3 x magnitude 0.5 of the impressions
    assert not any(e.item_id == new.item_id for e in events[: counted[8_000]] if isinstance(e, Click))
    bought = [line for o in events if isinstance(o, Order) and o.merchant_id == "m01" for line in o.items
              if line.item_id == new.item_id]
    assert bought and all(line.unit_price == new.price for line in bought)


def test_label_delay_drift_makes_orders_come_later_and_keeps_clicks():
    config = GeneratorConfig(merchants=6, events=20_000, seed=11,
                             drifts=(DriftSpec("m00", 8_000, "label_delay", magnitude=1.0),))
    base, drifted = stream(SMALL), stream(config)
    assert base[:8_000] == drifted[:8_000]

    def delays(events):
        last = {}
        for e in events:
            if isinstance(e, Click):
                last[e.session_id] = e.timestamp
        orders = [o for o in _after(events, 8_000, "m00") if isinstance(o, Order)]
        # an order's session id is its own: match it to its user's latest click before it
        by_user = {}
        for e in events:
            if isinstance(e, Click) and e.merchant_id == "m00":
                by_user.setdefault(e.user_id, []).append(e.timestamp)
        return [o.timestamp - max(t for t in by_user[o.user_id] if t <= o.timestamp) for o in orders]

    assert np.median(delays(drifted)) > 5 * np.median(delays(base))
    horizon = min(base[-1].timestamp, drifted[-1].timestamp) - 86_400
    clicks = [[e for e in s if isinstance(e, Click) and e.timestamp < horizon] for s in (base, drifted)]
    assert clicks[0] == clicks[1]


def test_invalid_configs_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        DriftSpec("m00", 10, "weather")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="merchant"):
        GeneratorConfig(merchants=3, drifts=(DriftSpec("m07", 10, "prices"),))
    with pytest.raises(ValueError, match="beyond"):
        GeneratorConfig(merchants=3, events=100, drifts=(DriftSpec("m01", 100, "prices"),))
    assert DriftSpec.parse("m03:500:prices:0.5") == DriftSpec("m03", 500, "prices", 0.5)
    with pytest.raises(ValueError):
        DriftSpec.parse("m03:soon")


# --- learnability: a logistic model on OUR features --------------------------------------------------------


def featurize(events, bits=18):
    """Features read before each event is observed (as the online learners do)."""
    featurizer, context = Featurizer(bits), FeatureContext()
    rows, labels, merchants = [], [], []
    for event in events:
        if isinstance(event, Click):
            rows.append(featurizer.transform(event, context)[0])
            labels.append(event.clicked)
            merchants.append(event.merchant_id)
        context.observe(event)
    return np.array(rows), np.array(labels, dtype=float), np.array(merchants)


def fit_logistic(x, y, bits=18, passes=3, lr=0.1):
    """AdaGrad logistic regression over hashed one-hot slots."""
    w, g2 = np.zeros(1 << bits), np.full(1 << bits, 1e-8)
    for _ in range(passes):
        for s in range(0, len(y), 256):
            xb = x[s:s + 256]
            grad = np.repeat(predict(w, xb) - y[s:s + 256], xb.shape[1])
            gw = np.bincount(xb.ravel(), weights=grad, minlength=len(w))
            g2 += gw**2
            w -= lr * gw / np.sqrt(g2)
    return w


def predict(w, x):
    return 1.0 / (1.0 + np.exp(-w[x].sum(axis=1)))


@pytest.mark.slow
def test_click_label_is_learnable_and_preference_drift_hurts_a_stale_model():
    base = GeneratorConfig(merchants=10, events=50_000, seed=3)
    drifted = GeneratorConfig(merchants=10, events=50_000, seed=3,
                              drifts=(DriftSpec("m00", at_event=30_000, kind="preferences"),))
    x, y, m = featurize(generate(base))
    xd, yd, md = featurize(generate(drifted))
    cut = int(0.55 * len(y))  # all before the drift
    assert (x[:cut] == xd[:cut]).all() and (y[:cut] == yd[:cut]).all()
    w = fit_logistic(x[:cut], y[:cut])
    held = np.arange(len(y)) >= int(0.62 * len(y))
    held_auc = roc_auc(y[held], predict(w, x[held]))
    assert 0.68 < held_auc < 0.85, held_auc
    prior = np.full(held.sum(), y[:cut].mean())
    assert mean_logloss(y[held], predict(w, x[held])) < mean_logloss(y[held], prior) - 0.03
    stable = held & (m == "m00")
    moved = (np.arange(len(yd)) >= int(0.62 * len(yd))) & (md == "m00")
    before, after = mean_logloss(y[stable], predict(w, x[stable])), mean_logloss(yd[moved], predict(w, xd[moved]))
    assert after > before * 1.05, (before, after)
    assert roc_auc(yd[moved], predict(w, xd[moved])) < roc_auc(y[stable], predict(w, x[stable])) - 0.02


def test_catalog_titles_carry_the_category_and_quality_words_and_nothing_else_changes():
    from streams.catalog_text import TIERS, VOCABULARY

    drift = DriftSpec("m01", 8_000, "popular_item", magnitude=0.5)
    events = list(generate(GeneratorConfig(merchants=6, events=20_000, seed=11, drifts=(drift,))))
    catalog = [e for e in events if isinstance(e, CatalogItem)]
    tier_of = {}
    for item in catalog:
        brand, tier, rest = item.title.split(" ", 2)
        words = [w for w in VOCABULARY[item.category] if w in rest]
        assert brand == item.brand and tier in TIERS and len(words) >= 2, item.title
        assert rest.endswith(f"#{item.item_id[1:]}")
        tier_of[(item.merchant_id, item.item_id)] = tier
    # the tier word carries the item's latent quality: better tiers are clicked more often when shown
    shown, clicked = Counter(), Counter()
    for e in events:
        if isinstance(e, Click):
            shown[tier_of[(e.merchant_id, e.item_id)]] += 1
            clicked[tier_of[(e.merchant_id, e.item_id)]] += e.clicked
    rate = [clicked[t] / shown[t] for t in TIERS]
    assert rate[0] < rate[1] < rate[2], rate
    # the drift's new item gets a title too, and the start catalog is the same as without the drift
    plain = [e for e in generate(SMALL) if isinstance(e, CatalogItem)]
    assert catalog[:len(plain)] == plain and len(catalog) == len(plain) + 1
