"""Per-merchant private stores: own-events-only featurization, prequential order, time split, Kafka source."""

from __future__ import annotations

import json

import numpy as np
import pytest

from federated.stores import (
    MerchantStore, StoreError, build_stores, build_stores_from_kafka, iter_rows, merchant_events_from_kafka, open_stores,
)
from streams.features import FIELDS, FeatureContext, Featurizer
from streams.generator import GeneratorConfig, generate
from streams.schemas import CatalogItem, Click, Order, LineItem

BITS = 14
CONFIG = GeneratorConfig(merchants=4, events=3000, seed=5)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    events = list(generate(CONFIG))
    return root, events, build_stores(events, root, bits=BITS)


def _click(n, merchant="m1", item="i1", clicked=False, t=1.7e9):
    return Click(event_id=f"e{n}", merchant_id=merchant, user_id="u1", item_id=item, session_id="s",
                 timestamp=t + n, position=n % 4, page="search", device="mobile", clicked=clicked)


def test_one_directory_per_merchant_with_time_split(generated):
    root, events, stores = generated
    assert sorted(stores) == ["m00", "m01", "m02", "m03"]
    for merchant_id, store in stores.items():
        assert store.path == root / "merchants" / merchant_id
        train, heldout = store.load("train"), store.load("heldout")
        assert train["indices"].dtype == np.int32 and train["indices"].shape[1] == len(FIELDS)
        assert train["values"].dtype == np.float32 and train["values"].shape == train["indices"].shape
        assert int(train["indices"].max()) < 2**BITS
        assert train["timestamps"].max() <= heldout["timestamps"].min()  # held-out is strictly later
        n_clicks = sum(isinstance(e, Click) and e.merchant_id == merchant_id for e in events)
        assert store.count("train") + store.count("heldout") == n_clicks
        assert abs(store.count("heldout") / n_clicks - 0.2) < 0.01
        meta = json.loads((store.path / "meta.json").read_text())
        assert meta["positives"]["train"] == float(train["labels"].sum())
        published = {e.item_id: (e.category, e.price) for e in events
                     if isinstance(e, CatalogItem) and e.merchant_id == merchant_id}
        ordered = {line.item_id for e in events if isinstance(e, Order) and e.merchant_id == merchant_id for line in e.items}
        catalog = store.catalog()  # the merchant's published catalog: its items only, nothing about users
        assert published.items() <= catalog.items() and set(catalog) <= set(published) | ordered
    assert MerchantStore(root, "m-none").catalog() == {}


def test_examples_use_only_the_merchants_own_events_prequentially(generated):
    _, events, stores = generated
    featurizer = Featurizer(BITS)
    context = FeatureContext()  # fed with m02's events only, one at a time: the prequential definition
    expected = []
    for event in events:
        if event.merchant_id != "m02":
            continue
        if isinstance(event, Click):
            expected.append(featurizer.transform(event, context)[0])
        context.observe(event)
    got = np.concatenate([stores["m02"].load("train")["indices"], stores["m02"].load("heldout")["indices"]])
    np.testing.assert_array_equal(got, np.array(expected))
    merchant_slot = featurizer.hash_names(["bias", "merchant=m02"] + ["x"] * (len(FIELDS) - 2))[1]
    assert set(got[:, FIELDS.index("merchant")].tolist()) == {merchant_slot}


def test_label_of_a_click_never_leaks_into_its_own_features(tmp_path):
    catalog = CatalogItem(event_id="c", merchant_id="m1", item_id="i1", category="shoes", price=10.0, title="t",
                          timestamp=1.6e9)
    events = [catalog] + [_click(n, clicked=True) for n in range(12)]
    store = build_stores(events, tmp_path, bits=BITS, holdout_fraction=0.25)["m1"]
    rows = np.concatenate([store.load("train")["indices"], store.load("heldout")["indices"]])
    affinity = rows[:, FIELDS.index("user_affinity")]
    assert affinity[0] != affinity[1] and len(set(affinity[1:].tolist())) == 1  # "new" first, "match" after


def test_orders_update_context_and_small_merchants_are_skipped(tmp_path):
    order = Order(event_id="o", order_id="o1", merchant_id="m1", user_id="u1", timestamp=1.7e9 + 0.5, currency="EUR",
                  items=[LineItem(item_id="i9", quantity=1, unit_price=3.0)])
    events = [_click(0), order] + [_click(n) for n in range(1, 20)] + [_click(n, merchant="tiny") for n in range(3)]
    stores = build_stores(events, tmp_path, bits=BITS, min_examples=10)
    assert list(stores) == ["m1"] and stores["m1"].count("train") == 16


def test_a_merchant_id_that_cannot_name_a_store_is_skipped_not_fatal(tmp_path, caplog):
    events = [_click(n, merchant=m) for n in range(12) for m in ("m1", "acme/eu", "..", "m2")]
    with caplog.at_level("WARNING", logger="fedstream.federated.stores"):
        stores = build_stores(events, tmp_path, bits=BITS)
    assert sorted(stores) == ["m1", "m2"]
    assert sorted(p.name for p in (tmp_path / "merchants").iterdir()) == ["m1", "m2"]
    skipped = {r.merchant: r.reason for r in caplog.records if r.getMessage() == "merchant skipped"}
    assert sorted(skipped) == ["..", "acme/eu"] and "cannot name a directory" in skipped["acme/eu"]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="holdout_fraction"):
        build_stores([], tmp_path, bits=BITS, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="cannot name a directory"):
        open_stores(tmp_path, ["../etc"])
    with pytest.raises(StoreError):
        open_stores(tmp_path, ["m-missing"])
    with pytest.raises(StoreError):
        MerchantStore(tmp_path, "m-missing").load("train")
    with pytest.raises(ValueError, match="split"):
        MerchantStore(tmp_path, "m1").split_dir("test")
    assert open_stores(tmp_path / "nothing") == {}


def test_open_stores_and_batches(generated):
    root, _, stores = generated
    reopened = open_stores(root)
    assert sorted(reopened) == sorted(stores)
    arrays = reopened["m01"].load("train")
    sizes = [len(b["labels"]) for b in iter_rows(arrays, 64)]
    assert sum(sizes) == len(arrays["labels"]) and max(sizes) == 64


def test_each_merchant_builds_its_store_from_kafka(kafka_settings, generated, tmp_path):
    from streams.producer import EventProducer

    _, events, stores = generated
    producer = EventProducer(kafka_settings, now=2e9)
    try:
        summary = producer.send_many(events)
    finally:
        producer.close()
    assert summary["accepted"] == len(events)
    from_kafka = build_stores_from_kafka(kafka_settings, tmp_path / "one", ["m03"], bits=BITS)
    assert list(from_kafka) == ["m03"]
    everyone = build_stores_from_kafka(kafka_settings, tmp_path / "all", bits=BITS)
    assert sorted(everyone) == sorted(stores)
    for split in ("train", "heldout"):
        direct, read = stores["m03"].load(split), from_kafka["m03"].load(split)
        np.testing.assert_array_equal(direct["indices"], read["indices"])
        np.testing.assert_array_equal(direct["labels"], read["labels"])
        np.testing.assert_array_equal(stores["m01"].load(split)["indices"], everyone["m01"].load(split)["indices"])
    assert len(merchant_events_from_kafka(kafka_settings, "m02")) == sum(e.merchant_id == "m02" for e in events)


def test_a_store_from_kafka_prices_clicks_as_they_were_when_the_catalog_changes_midstream(kafka_settings, tmp_path):
    """Prices re-issued mid-stream: Kafka's events come back in event time order, so a click before the
    change is featurized with the old price, exactly as from the stream itself (catalog-first order used to
    give every click the new prices)."""
    from streams.generator import DriftSpec
    from streams.producer import EventProducer

    config = GeneratorConfig(merchants=2, events=3000, seed=8, drifts=(DriftSpec("m00", at_event=1500, kind="prices"),))
    events = list(generate(config))
    direct = build_stores(events, tmp_path / "direct", bits=BITS)
    producer = EventProducer(kafka_settings, now=2e9)
    try:
        assert producer.send_many(events)["accepted"] == len(events)
    finally:
        producer.close()
    read = build_stores_from_kafka(kafka_settings, tmp_path / "kafka", ["m00"], bits=BITS)
    for split in ("train", "heldout"):
        np.testing.assert_array_equal(read["m00"].load(split)["indices"], direct["m00"].load(split)["indices"])
