"""Click + purchase learning with late conversions: the attribution joiner, the multi-task learner, the worker
hook and its checkpoint, and the federated model's purchase head."""

from __future__ import annotations

import dataclasses
import pickle
import time

import numpy as np
import pytest

from fedstream.metrics import expected_calibration_error
from online.attribution import AttributionJoiner, attributed_labels
from online.multitask import MultiTaskClassifier, MultiTaskState
from streams.features import FeatureContext, Featurizer
from streams.generator import GeneratorConfig, generate
from streams.schemas import Click, Order


def _replay(joiner: AttributionJoiner, events: list[tuple]) -> list[tuple[float, str, bool]]:
    """Feed ("click", t, user, item, name) / ("order", t, user, [items]) / ("tick", t); returns
    (time emitted, name, converted) for every resolved click."""
    out = []
    for kind, when, *rest in events:
        if kind == "click":
            resolved = joiner.click("m1", rest[0], rest[1], when, rest[2])
        elif kind == "order":
            resolved = joiner.order("m1", rest[0], rest[1], when)
        else:
            resolved = joiner.advance(when)
        out += [(when, r.payload, r.converted) for r in resolved]
    return out


@pytest.mark.parametrize("release", ["order", "window"])
def test_no_negative_before_the_window_closes_and_a_late_order_inside_it_is_a_positive(release):
    hour = 3600.0
    joiner = AttributionJoiner(window_s=24 * hour, lateness_s=0.0, release=release)
    events = [("click", 0.0, "u1", "i1", "late-buyer"), ("click", 10.0, "u2", "i2", "never"),
              ("click", 20.0, "u3", "i3", "too-late")]
    events += [("tick", k * hour) for k in range(1, 24)]  # a day of other traffic: no window has closed
    events += [("order", 23.5 * hour, "u1", ["i1"])]  # 23.5 h after its click: inside the window
    events += [("tick", 24 * hour + 15.0), ("tick", 24 * hour + 30.0), ("order", 25 * hour, "u3", ["i3"])]
    emitted = _replay(joiner, events)
    negatives = {name: when for when, name, converted in emitted if not converted}
    assert negatives == {"never": 24 * hour + 15.0, "too-late": 24 * hour + 30.0}  # exactly when each window closed
    positive_at = 23.5 * hour if release == "order" else 24 * hour + 15.0  # "window": held until its window closed
    assert (positive_at, "late-buyer", True) in emitted and len(emitted) == 3
    assert joiner.pending == 0 and joiner.positives == 1 and joiner.negatives == 2


def test_joiner_labels_equal_the_fully_attributed_labels_and_memory_is_bounded():
    events = [e for e in generate(GeneratorConfig(merchants=2, events=6000, seed=3, conversion_delay_s=1800.0))
              if isinstance(e, (Click, Order))]
    joiner = AttributionJoiner(window_s=3 * 3600.0, lateness_s=0.0)
    got, clicks, orders = {}, [], []
    for event in events:
        if isinstance(event, Click):
            if event.clicked:
                clicks.append((event.merchant_id, event.user_id, event.item_id, event.timestamp))
                resolved = joiner.click(*clicks[-1], len(clicks) - 1)
            else:
                resolved = joiner.advance(event.timestamp)
        else:
            orders.append((event.merchant_id, event.user_id, [line.item_id for line in event.items], event.timestamp))
            resolved = joiner.order(*orders[-1])
        got.update({r.payload: r.converted for r in resolved})
    truth = attributed_labels(clicks, orders, window_s=3 * 3600.0)
    assert sum(truth) > 20 and len(got) + joiner.pending == len(clicks)
    assert all(got[k] == truth[k] for k in got)  # every label emitted is the final one
    small = AttributionJoiner(window_s=3 * 3600.0, max_pending=5)
    for k, (merchant, user, item, when) in enumerate(clicks[:50]):
        small.click(merchant, user, item, when, k)
        assert small.pending <= 5
    assert small.evicted > 0


def test_joiner_checkpoint_round_trip_resumes_identically():
    rng = np.random.default_rng(0)
    stream = []
    for k in range(400):
        when = k * 60.0
        if rng.random() < 0.7:
            stream.append(("click", when, f"u{rng.integers(20)}", f"i{rng.integers(10)}", k))
        else:
            stream.append(("order", when, f"u{rng.integers(20)}", [f"i{rng.integers(10)}"]))
    whole = AttributionJoiner(window_s=3600.0, merchant_windows_s={"m1": 5400.0})
    expected = _replay(whole, stream)
    first = AttributionJoiner(window_s=3600.0, merchant_windows_s={"m1": 5400.0})
    head = _replay(first, stream[:200])
    restored = pickle.loads(pickle.dumps(first))
    assert restored.stats() == first.stats()
    assert head + _replay(restored, stream[200:]) == expected
    assert 0 < restored.positives < restored.negatives


def _calibration(events: list, release: str) -> tuple[float, float, float, int]:
    """ECE of P(order | click), P(order | impression), P(click) against the fully attributed labels."""
    state = MultiTaskState(MultiTaskClassifier(bits=16), AttributionJoiner(window_s=6 * 3600.0, release=release))
    featurizer, context = Featurizer(16), FeatureContext()
    keys, p_click, p_conversion, clicked, orders = [], [], [], [], []
    for event in events:
        if isinstance(event, Click):
            row = np.array(featurizer.slots_for(event.merchant_id, event.user_id, event.item_id, event.timestamp,
                                                event.device, event.page, event.position, context))
            click, conversion = state.click(event, row)
            p_click.append(click)
            p_conversion.append(conversion)
            clicked.append(event.clicked)
            keys.append((event.merchant_id, event.user_id, event.item_id, event.timestamp))
        elif isinstance(event, Order):
            state.order(event)
            orders.append((event.merchant_id, event.user_id, [line.item_id for line in event.items], event.timestamp))
        context.observe(event)
    clicked = np.array(clicked)
    ordered = clicked & np.array(attributed_labels(keys, orders, window_s=6 * 3600.0))
    p_click, p_conversion = np.array(p_click), np.array(p_conversion)
    return (expected_calibration_error(ordered[clicked], p_conversion[clicked]),
            expected_calibration_error(ordered, p_click * p_conversion), expected_calibration_error(clicked, p_click),
            state.model.updates["conversion"])


def test_multitask_predictions_on_a_seeded_stream_are_calibrated():
    events = list(generate(GeneratorConfig(merchants=2, events=20_000, seed=4, conversion_delay_s=1800.0)))
    given_click, given_impression, click, learned = _calibration(events, "window")
    assert learned > 1000
    assert given_click < 0.05 and given_impression < 0.02 and click < 0.03
    # positives learned when their order arrives, negatives a window later: worse calibrated on the same stream
    assert _calibration(events, "order")[0] > given_click + 0.005


def test_worker_hook_learns_both_tasks_and_its_state_is_checkpointed(settings, tmp_path):
    from online.worker import OnlineWorker, WorkerConfig, read_checkpoint
    from streams.consumer import Record

    events = list(generate(GeneratorConfig(merchants=2, events=3000, seed=5, conversion_delay_s=60.0)))
    records = [Record(e, "events", 0, offset, int(time.time() * 1000), None) for offset, e in enumerate(events)]
    config = WorkerConfig(model="ftrl", checkpoint_path=tmp_path / "mt.ckpt", block=256, publish_every_s=None)
    plain = OnlineWorker(settings, dataclasses.replace(config, checkpoint_path=tmp_path / "p.ckpt"))
    assert plain.state.multitask is None  # default path: no multi-task state
    enabled = settings.model_copy(update={"multitask": settings.multitask.model_copy(
        update={"enabled": True, "attribution_window_s": 600.0})})
    worker = OnlineWorker(enabled, config)
    worker.accept(records)
    worker.flush_stale(force=True)
    state = worker.state.multitask
    assert state.model.updates["click"] == sum(isinstance(e, Click) for e in events)
    assert state.joiner.positives > 0 and state.resolved > 100
    assert worker.metrics()["multitask_positives"] == state.joiner.positives
    worker.checkpoint(commit=False)
    resumed = OnlineWorker(enabled, config).state.multitask
    assert read_checkpoint(tmp_path / "mt.ckpt") is not None
    assert resumed.joiner.stats() == state.joiner.stats()
    assert np.array_equal(resumed.model.w["shared"], state.model.w["shared"])
    assert OnlineWorker(settings, config).state.multitask is None  # the setting decides, not the checkpoint


@pytest.mark.slow  # TFF: its execution context takes tens of seconds to start on a loaded machine
def test_federated_multitask_model_trains_one_round_and_both_heads_are_probabilities(tmp_path):
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_federated as tff

    from federated.model import ModelConfig, NumpyScorer, build_keras_model, tff_model_fn
    from federated.stores import build_stores
    from federated.training import (
        FederatedConfig, FederatedData, build_evaluation, build_process, run_rounds,
    )
    from fedstream.processes import stop_tff_workers

    events = generate(GeneratorConfig(merchants=3, events=6000, seed=3, conversion_delay_s=600.0))
    stores = build_stores(events, tmp_path, bits=10, attribution_window_s=3600.0)
    labels = stores["m00"].load("train")["labels"]
    assert labels.shape[1] == 2 and labels[:, 1].sum() > 0 and np.all(labels[:, 1] <= labels[:, 0])
    model = ModelConfig(bits=10, multitask=True)
    tff.backends.native.set_sync_local_cpp_execution_context()
    try:
        config = FederatedConfig(rounds=1, clients_per_round=3, batch_size=32)
        process = build_process(tff_model_fn(model), config, model.label_width)
        state, history = run_rounds(process, process.initialize(), FederatedData.from_stores(stores), config,
                                    evaluation=build_evaluation(tff_model_fn(model), model.label_width))
        trained = process.get_model_weights(state)  # a TFF computation: before its workers are stopped
    finally:
        stop_tff_workers()
    metrics = history[-1].metrics()
    assert {"eval_auc", "eval_purchase_auc", "train_logloss", "train_purchase_logloss"} <= set(metrics)
    assert 0.0 < metrics["eval_purchase_auc"] <= 1.0 and 0.0 < metrics["eval_auc"] <= 1.0
    keras_model = build_keras_model(model)
    for variable, value in zip(keras_model.trainable_weights, trained.trainable):
        variable.assign(value)
    heldout = stores["m00"].load("heldout")
    both = keras_model.predict({"indices": heldout["indices"], "values": heldout["values"]}, verbose=0)
    assert both.shape == (len(heldout["indices"]), 2) and np.all((both >= 0) & (both <= 1))
    assert np.all(both[:, 1] <= both[:, 0])  # P(order | impression) = P(click) P(order | click)
    scorer = NumpyScorer.from_keras(model, keras_model)
    np.testing.assert_allclose(scorer.predict_purchase_many(heldout["indices"], heldout["values"]), both[:, 1],
                               rtol=1e-4, atol=1e-6)


def _enabled(settings):
    return settings.model_copy(update={"multitask": settings.multitask.model_copy(
        update={"enabled": True, "attribution_window_s": 600.0})})


def test_a_published_version_carries_the_multitask_model_and_serving_ranks_by_expected_purchase(settings, tmp_path):
    from fastapi.testclient import TestClient

    from online.multitask import rerank_by_purchase
    from online.publishing import assembled_snapshot, snapshot
    from online.worker import OnlineWorker, WorkerConfig
    from registry.models import promote, register_version
    from serving.app import create_app
    from serving.keys import KeyStore
    from streams.consumer import Record

    events = list(generate(GeneratorConfig(merchants=2, events=3000, seed=5, conversion_delay_s=60.0)))
    records = [Record(e, "events", 0, offset, int(time.time() * 1000), None) for offset, e in enumerate(events)]
    workers = {}
    for name, part in (("a", records), ("b", records[:1000])):  # two checkpoints in one store; "a" learned more
        config = WorkerConfig(model="ftrl", store=tmp_path / "store", worker_id=name, block=256, publish_every_s=None)
        workers[name] = OnlineWorker(_enabled(settings), config)
        workers[name].accept(part)
        workers[name].flush_stale(force=True)
        workers[name].checkpoint(commit=False)
    state, worker = workers["a"].state.multitask, workers["a"]
    taken = snapshot(worker.state, worker.config, {})
    bundle = taken["bundle"]
    assert taken["lineage"]["multitask"] == "single"
    rows = np.array([bundle.featurizer.slots_for("m00", "u1", f"i{k}", 1e9, "mobile", "recommendation", 0,
                                                 bundle.context) for k in range(20)])
    served_click, served_conversion = bundle.multitask.predict_many(rows, np.ones(rows.shape))
    for row, click, conversion in zip(rows, served_click, served_conversion):  # the learner's calibrated view
        p_click, p_conversion = state.model.predict_row(row, np.ones(len(row)))
        z = np.log(p_conversion / (1 - p_conversion))
        assert abs(click - p_click) < 1e-5 and abs(conversion - state.calibrator.predict(z)) < 1e-5
    assert bundle.multitask.click.nbytes + bundle.multitask.conversion.nbytes == 2 * 4 << settings.feature_bits

    # ranked by expected purchase: the ranker's top 30 re-ordered as rerank_by_purchase orders them
    merchant, user = "m00", next(e.user_id for e in events if isinstance(e, Order) and e.merchant_id == "m00")
    top = [r.item_id for r in bundle.recommend_items(merchant, user, 30)]
    shop = bundle.recommender.state.shops[merchant]
    expected = rerank_by_purchase(state, bundle.featurizer, bundle.context, merchant, user, top, shop.clock, weight=3.0)
    by_purchase = bundle.recommend_items(merchant, user, 10, by="expected_purchase", purchase_weight=3.0)
    assert expected[:10] != top[:10]  # the re-order changes the page
    assert [r.item_id for r in by_purchase] == expected[:10] and bundle.ranked_by("expected_purchase") == "expected_purchase"
    assert bundle.ranked_by() == "ranker" and [r.item_id for r in bundle.recommend_items(merchant, user, 10)] == top[:10]

    # assembled from both checkpoints: both workers' multi-task weights, merged per hashed slot
    from online.assembly import merge_multitask

    assembled = assembled_snapshot(tmp_path / "store", worker.config, {})
    assert assembled["lineage"]["multitask"] == "slot-activity-weighted" and assembled["lineage"]["multitask_merged"] == 2
    both = merge_multitask([state, workers["b"].state.multitask])
    np.testing.assert_array_equal(assembled["bundle"].multitask.conversion, both.conversion)
    assert assembled["bundle"].multitask.calibration == both.calibration

    register_version(settings, bundle, name=settings.serving.model_name, metrics={}, lineage={})
    promote(settings, settings.serving.model_name, version="1", force=True)
    key = KeyStore.for_settings(settings).issue(merchant)
    url, params = f"/v1/merchants/{merchant}/recommendations", {"user_id": user, "k": 10}
    purchase_first = settings.model_copy(update={"serving": settings.serving.model_copy(
        update={"rank_by": "expected_purchase", "purchase_weight": 3.0})})
    with TestClient(create_app(purchase_first, poll=False)) as client:
        body = client.get(url, params=params, headers={"X-API-Key": key}).json()
    assert body["ranked_by"] == "expected_purchase" and [i["item_id"] for i in body["items"]] == expected[:10]
    assert [i["score"] for i in body["items"]] == [r.score for r in by_purchase]  # P(order | impression)


def test_personalization_on_a_multitask_store_trains_both_columns_and_scores_clicks_on_column_0(tmp_path):
    from federated.model import ModelConfig, NumpyScorer
    from federated.personalize import PersonalizationConfig, compare_merchant, summarize
    from federated.stores import build_stores

    events = generate(GeneratorConfig(merchants=1, events=2500, seed=3, conversion_delay_s=600.0))
    store = build_stores(events, tmp_path, bits=10, attribution_window_s=3600.0)["m00"]
    config = ModelConfig(bits=10, multitask=True)
    budget = PersonalizationConfig(local_epochs=1, finetune_epochs=1)
    row = compare_merchant(store, config, NumpyScorer.initial(config), budget)
    assert row["global_auc"] == 0.5  # the untrained model ties every impression
    assert 0.55 < row["local_auc"] <= 1.0 and 0.5 < row["local_purchase_auc"] <= 1.0
    assert 0.0 < row["finetuned_logloss"] < 0.7  # column 0 against P(click): a click-task log loss
    assert summarize([row])["all_local_purchase_auc"] == row["local_purchase_auc"]
