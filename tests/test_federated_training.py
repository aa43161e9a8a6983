"""Federated training with real TFF: FedAvg learns, dropouts, DP accounting, secure aggregation, FedProx/Yogi,
MLflow logging and registration, the CLI. One module-scoped TFF setup; worker_binary stopped by PID."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest

from federated.model import ModelConfig, NumpyScorer, build_keras_model, named_weights
from federated.stores import build_stores, client_dataset
from federated.training import (
    FederatedConfig, FederatedData, build_evaluation, build_process, dp_epsilon, run_rounds, sample_clients,
    use_execution_context,
)
from fedstream.processes import tff_workers
from streams.generator import GeneratorConfig, generate

pytestmark = pytest.mark.slow
BITS = 14
MODEL = ModelConfig(bits=BITS)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    return build_stores(generate(GeneratorConfig(merchants=6, events=9000, seed=3)), root, bits=BITS)


@pytest.fixture(scope="module")
def model_fn():
    from federated.model import tff_model_fn

    return tff_model_fn(MODEL)


def test_client_dataset_reads_the_store_lazily(stores, tff_module):
    import tensorflow as tf

    dataset = client_dataset(stores["m01"], "heldout", batch_size=1000)
    graph = tf.raw_ops.DatasetToGraphV2(input_dataset=dataset._variant_tensor).numpy()
    assert b"examples-heldout/indices.npy" in graph and len(graph) < 50_000  # paths, not examples
    features, labels = next(iter(dataset))
    arrays = stores["m01"].load("heldout")
    np.testing.assert_array_equal(features["indices"].numpy(), arrays["indices"])
    np.testing.assert_array_equal(labels.numpy()[:, 0], arrays["labels"])


def test_tff_gets_a_path_and_a_seed_per_client_and_reads_there(stores, tff_module, model_fn):
    from federated.training import train_dataset_computation

    process = build_process(model_fn, FederatedConfig(rounds=1, batch_size=16))
    client_arg = process.next.type_signature.parameter[1]
    assert str(client_arg) == "{<folder=str,seed=int64>}@CLIENTS"  # no sequence, no tensor of examples
    comp = train_dataset_computation(16, 2)
    assert comp.to_building_block().proto.ByteSize() < 50_000  # the pipeline definition, not data
    batches = list(comp(str(stores["m02"].split_dir("train")), 5))
    arrays = stores["m02"].load("train")
    assert sum(len(y) for _, y in batches) == 2 * len(arrays["labels"]) and len(batches[0][1]) == 16
    n = len(arrays["labels"])
    first_epoch = np.concatenate([x["indices"].numpy() for x, _ in batches])[:n]
    assert not np.array_equal(first_epoch, arrays["indices"])  # shuffled ...
    np.testing.assert_array_equal(np.sort(first_epoch, axis=0), np.sort(arrays["indices"], axis=0))  # ... same rows
    data = FederatedData.from_stores(stores)
    assert data.train["m02"]() == str(stores["m02"].split_dir("train"))


def test_touched_mean_averages_each_slot_over_the_clients_that_moved_it(tff_module):
    from federated.aggregators import touched_mean_factory

    process = touched_mean_factory().create(tff_module.TensorType(np.float32, [4]), tff_module.TensorType(np.float32))
    deltas = [np.array([1.0, 0.0, 2.0, 0.0], np.float32), np.array([3.0, 0.0, 0.0, -1.0], np.float32)]
    output = process.next(process.initialize(), deltas, [np.float32(1.0), np.float32(3.0)])
    # slot 0: both clients (weighted mean 2.5); slot 2 only client 0; slot 3 only client 1; slot 1 nobody
    np.testing.assert_allclose(output.result, [2.5, 0.0, 2.0, -1.0])
    with pytest.raises(ValueError, match="aggregation"):
        FederatedConfig(aggregation="median")  # type: ignore[arg-type]


def test_numpy_scorer_matches_keras(tff_module):
    config = ModelConfig(bits=10, deep=True)
    model = build_keras_model(config)
    rng = np.random.default_rng(0)
    for variable in model.trainable_weights:
        variable.assign(rng.normal(0, 0.3, variable.shape).astype(np.float32))
    indices = rng.integers(0, 2**10, (50, 18)).astype(np.int32)
    values = rng.random((50, 18)).astype(np.float32)
    keras_p = model({"indices": indices, "values": values}).numpy()[:, 0]
    scorer = NumpyScorer(config, named_weights(model))
    np.testing.assert_allclose(scorer.predict_proba_many(indices, values), keras_p, rtol=1e-4, atol=1e-6)
    assert not hasattr(scorer, "linear_terms")
    assert hasattr(NumpyScorer.initial(ModelConfig(bits=10)), "linear_terms")
    with pytest.raises(ValueError):
        ModelConfig(bits=30)


def test_fedavg_learns_with_seeded_sampling(stores, tff_module, model_fn):
    config = FederatedConfig(rounds=4, clients_per_round=3, seed=11, eval_every=4, server_optimizer="adam",
                             server_learning_rate=0.05)
    data = FederatedData.from_stores(stores)
    process = build_process(model_fn, config)
    evaluation = build_evaluation(model_fn)
    eval_state = evaluation.initialize()
    from federated.training import evaluate_federated

    _, before = evaluate_federated(evaluation, eval_state, process.get_model_weights(process.initialize()), data)
    state, history = run_rounds(process, process.initialize(), data, config, evaluation=evaluation)
    assert [r.round for r in history] == [1, 2, 3, 4]
    assert all(len(r.participants) == 3 and not r.dropped for r in history)
    assert [r.sampled for r in history] == [sample_clients(data.client_ids, 3, k, 11) for k in range(1, 5)]
    assert len({tuple(r.sampled) for r in history}) > 1
    assert before["auc"] == pytest.approx(0.5, abs=0.02)
    assert history[-1].evaluation["auc"] > 0.62
    assert history[-1].evaluation["num_examples"] == sum(s.count("heldout") for s in stores.values())
    assert history[-1].train["num_examples"] == sum(data.counts[m] for m in history[-1].participants)


def test_dropouts_are_excluded_from_the_cohort(stores, tff_module, model_fn, tmp_path):
    broken = dict(stores)
    gone = build_stores([], tmp_path, bits=BITS)  # no events: nothing built
    assert gone == {}
    # a merchant whose store vanished mid-run, plus seeded simulated failures
    victim = stores["m05"]
    copy = tmp_path / "copy"
    shutil.copytree(victim.root / "merchants" / "m05", copy / "merchants" / "m05")
    from federated.stores import MerchantStore

    broken["m05"] = MerchantStore(copy, "m05")
    data = FederatedData.from_stores(broken)
    shutil.rmtree(copy / "merchants" / "m05" / "examples-train")
    config = FederatedConfig(rounds=3, clients_per_round=6, dropout_rate=0.3, seed=2)
    process = build_process(model_fn, config)
    state, history = run_rounds(process, process.initialize(), data, config)
    for result in history:
        assert "m05" in result.dropped and "m05" not in result.participants
        assert set(result.participants) | set(result.dropped) == set(result.sampled)
        assert result.train["num_examples"] == sum(data.counts[m] for m in result.participants)
    assert sum(len(r.dropped) for r in history) > 3  # simulated failures on top of the broken store
    all_fail = FederatedConfig(rounds=1, clients_per_round=1, dropout_rate=0.0, seed=2)
    data.train = {m: data.train["m05"] for m in data.train}  # every store broken: the round is skipped
    same_state, skipped = run_rounds(process, state, data, all_fail)
    assert skipped[0].skipped and skipped[0].participants == []
    np.testing.assert_array_equal(process.get_model_weights(same_state).trainable[0],
                                  process.get_model_weights(state).trainable[0])


def test_dp_aggregate_is_the_clipped_mean_plus_noise_of_the_configured_scale(tff_module):
    """DP-FedAvg's aggregator (as built for the process): every client's update is clipped to ``clip`` and
    the mean gets Gaussian noise of std ``noise_multiplier x clip / clients_per_round`` per coordinate."""
    from federated.training import build_aggregator

    dim, n, z, clip = 20_000, 4, 0.5, 1.0
    config = FederatedConfig(clients_per_round=n, dp=True, noise_multiplier=z, clip=clip)
    process = build_aggregator(config).create(tff_module.TensorType(np.float32, [dim]))
    rng = np.random.default_rng(5)
    directions = [v / np.linalg.norm(v) for v in rng.normal(size=(n, dim))]
    norms = [0.5, 3.0, 40.0, 1000.0]  # one inside the clip, three far outside
    updates = [(d * r).astype(np.float32) for d, r in zip(directions, norms)]
    result = np.asarray(process.next(process.initialize(), updates).result, np.float64)
    clipped_mean = sum(d * min(r, clip) for d, r in zip(directions, norms)) / n
    noise, sigma = result - clipped_mean, z * clip / n
    assert np.std(noise) == pytest.approx(sigma, rel=0.05)  # the configured noise scale, not 0, not more
    assert abs(np.mean(noise)) < 5 * sigma / math.sqrt(dim)
    for d, r in zip(directions, norms):  # along each client's direction only its clipped share + noise
        assert abs(float(noise @ d)) < 5 * sigma, f"client of norm {r} was not clipped to {clip}"


def test_dp_fedavg_runs_and_accounts_epsilon(stores, tff_module, model_fn):
    config = FederatedConfig(rounds=2, clients_per_round=4, dp=True, noise_multiplier=0.3, clip=1.0)
    process = build_process(model_fn, config)
    state, history = run_rounds(process, process.initialize(), FederatedData.from_stores(stores), config)
    assert all(np.isfinite(w).all() for w in process.get_model_weights(state).trainable)
    assert all(set(r.participants) <= set(stores) and not r.skipped for r in history)
    eps2, eps20 = dp_epsilon(0.3, 4 / 6, 2, 1e-5), dp_epsilon(0.3, 4 / 6, 20, 1e-5)
    assert 0 < eps2 < eps20 < math.inf
    assert dp_epsilon(3.0, 0.1, 20, 1e-5) < 1.0 < dp_epsilon(0.8, 0.1, 20, 1e-5)
    FederatedConfig(rounds=1, clients_per_round=5, dp=True, noise_multiplier=0.4)  # adaptive: 0.4 < 0.1 x 5
    with pytest.raises(ValueError, match="0.1 x clients_per_round"):
        FederatedConfig(clients_per_round=3, dp=True, noise_multiplier=0.5)
    with pytest.raises(ValueError, match="noise multiplier"):
        FederatedConfig(dp=True)
    with pytest.raises(ValueError):
        FederatedConfig(dp=True, noise_multiplier=0.1, clip=1.0, secure_agg=True)


def test_dp_cohorts_are_secret_poisson_samples_not_the_logged_seed(stores, tff_module, model_fn):
    """ε counts amplification by sampling: the cohorts must not be reproducible from the run's seed.

    Two DP runs with the same seed over 6 merchants (q = 4/6) draw the same 3 cohorts with probability
    (q^2 + (1-q)^2)^(6x3) ~ 2e-5; a seeded sampler draws them every time.
    """
    config = FederatedConfig(rounds=3, clients_per_round=4, dp=True, noise_multiplier=1.0, clip=1.0, seed=5)
    data = FederatedData.from_stores(stores)
    process = build_process(model_fn, config)
    runs = [run_rounds(process, process.initialize(), data, config)[1] for _ in range(2)]
    cohorts = [[r.sampled for r in history] for history in runs]
    assert cohorts[0] != cohorts[1]
    assert cohorts[0] != [sample_clients(data.client_ids, 4, k, 5) for k in (1, 2, 3)]
    from federated.training import secret_poisson_cohort

    draws = [secret_poisson_cohort([f"m{k:03d}" for k in range(400)], 0.25) for _ in range(2)]
    assert draws[0] != draws[1] and all(60 < len(d) < 140 for d in draws)  # Poisson, not a fixed-size cohort
    # a DP round whose whole cohort dropped out still releases its noise (the accountant counted it)
    data.train = {m: (lambda: (_ for _ in ()).throw(OSError("store gone"))) for m in data.train}
    state = process.initialize()
    moved, history = run_rounds(process, state, data, dataclasses.replace(config, rounds=1))
    assert history[0].participants == [] and not history[0].skipped
    assert not np.array_equal(process.get_model_weights(moved).trainable[0], process.get_model_weights(state).trainable[0])


def test_secure_aggregation_equals_the_plain_weighted_mean(stores, tff_module, model_fn):
    """Secure aggregation changes how the sum is computed, not what it is: the aggregate equals the
    example-weighted mean (updates far beyond TFF's default clip norm of 1 included), and a secure round
    gives the same model as a plain-mean round on the same cohort."""
    from federated.training import build_aggregator

    config = FederatedConfig(rounds=2, clients_per_round=3, secure_agg=True, seed=4)
    try:
        assert use_execution_context(config) == "sync_test_cpp"
        rng = np.random.default_rng(9)
        updates = [rng.normal(0, scale, 64).astype(np.float32) for scale in (0.02, 3.0, 40.0)]
        updates[0][:20] = 0.0  # untouched slots count as zeros in the plain mean
        weights = [np.float32(w) for w in (37, 912, 4100)]
        aggregator = build_aggregator(config).create(tff_module.TensorType(np.float32, [64]),
                                                     tff_module.TensorType(np.float32))
        result = aggregator.next(aggregator.initialize(), updates, weights).result
        np.testing.assert_allclose(result, np.average(updates, axis=0, weights=weights), rtol=1e-5, atol=1e-5)

        data = FederatedData.from_stores(stores)
        secure = build_process(model_fn, config)
        state, history = run_rounds(secure, secure.initialize(), data, config)
        plain_config = FederatedConfig(rounds=2, clients_per_round=3, aggregation="mean", seed=4)
        plain = build_process(model_fn, plain_config)
        plain_state, plain_history = run_rounds(plain, plain.initialize(), data, plain_config)
        assert [r.participants for r in history] == [r.participants for r in plain_history]
        assert history[-1].train["num_examples"] > 0
        for got, want in zip(secure.get_model_weights(state).trainable, plain.get_model_weights(plain_state).trainable):
            assert np.abs(want).max() > 0.1
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    finally:
        use_execution_context(FederatedConfig())


def test_switching_contexts_does_not_wait_for_a_stuck_worker(stores, tff_module, model_fn):
    """Replacing a context makes TFF's finalizer SIGINT the old worker_binary and wait for it; a worker that
    does not exit (here: stopped with SIGSTOP) once hung the suite. The switch must stop it and go on."""
    import contextlib
    import signal
    import threading

    local = FederatedConfig(rounds=1, clients_per_round=2)
    use_execution_context(FederatedConfig(secure_agg=True))
    use_execution_context(local)  # a fresh local context, installed by us
    process = build_process(model_fn, local)
    run_rounds(process, process.initialize(), FederatedData.from_stores(stores), local)  # starts its worker
    stuck = tff_workers(children_only=True)
    assert stuck
    for pid in stuck:
        os.kill(pid, signal.SIGSTOP)
    switch = threading.Thread(target=use_execution_context, args=(FederatedConfig(secure_agg=True),), daemon=True)
    switch.start()
    switch.join(timeout=60)
    try:
        assert not switch.is_alive(), "switching the execution context hung on the old worker_binary"
        assert not set(stuck) & set(tff_workers())
    finally:
        for pid in stuck:  # frees a hung switch, so a failure is reported instead of hanging the run
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        switch.join(timeout=30)
        use_execution_context(FederatedConfig())


@pytest.fixture(scope="module")
def separable_stores(tmp_path_factory):
    """4 merchants whose click label is a function of one hashed slot (slot 1 -> clicked, slot 2 -> not), plus
    two uninformative slots from a shared pool: anything that learns gets the logloss far below chance (0.693)."""
    from federated.model import N_FIELDS
    from federated.stores import write_store

    rng, root, stores = np.random.default_rng(13), tmp_path_factory.mktemp("separable"), {}
    for k in range(4):
        n = 240
        labels = (rng.random(n) < 0.5).astype(np.float32)
        indices = np.zeros((n, N_FIELDS), np.int32)
        indices[:, 0] = np.where(labels > 0, 1, 2)
        indices[:, 1:3] = rng.integers(16, 80, (n, 2))
        values = np.zeros((n, N_FIELDS), np.float32)
        values[:, :3] = 1.0
        arrays = {"indices": indices, "values": values, "labels": labels,
                  "timestamps": np.arange(n, dtype=np.float64) + 1.7e9}
        stores[f"m{k:02d}"] = write_store(root, f"m{k:02d}", arrays, holdout_fraction=0.25, bits=BITS)
    return stores


@pytest.mark.parametrize("options", [
    dict(server_optimizer="sgd"), dict(server_optimizer="adam"),
    dict(server_optimizer="yogi", prox_mu=0.1, clip=2.0),
], ids=["fedavg-sgd", "adam", "fedprox-yogi-clip"])
def test_server_optimizers_learn_a_separable_task(separable_stores, tff_module, model_fn, options):
    """Each server optimizer at the configured default learning rate (FedProx and clipping on the Yogi run)."""
    config = FederatedConfig(rounds=8, clients_per_round=3, seed=1, eval_every=8, **options)
    data = FederatedData.from_stores(separable_stores)
    process = build_process(model_fn, config)
    _, history = run_rounds(process, process.initialize(), data, config, evaluation=build_evaluation(model_fn))
    assert history[-1].train["loss"] < 0.25, history[-1].train  # chance is 0.693
    assert history[-1].evaluation["loss"] < 0.25 and history[-1].evaluation["auc"] > 0.99, history[-1].evaluation
    assert history[0].train["loss"] > history[-1].train["loss"]


def test_bad_server_optimizer_is_refused():
    with pytest.raises(ValueError, match="server_optimizer"):
        FederatedConfig(server_optimizer="rmsprop")  # type: ignore[arg-type]


def test_run_logs_rounds_and_registers_versions(stores, tff_module, settings):
    from mlflow.tracking import MlflowClient

    from fedstream.metrics import roc_auc as auc
    from federated.personalize import PersonalizationConfig, compare_merchants, summarize
    from federated.runner import MODEL_NAME, run_federated
    from registry.models import load_bundle, version_lineage
    from registry.tracking import tracking_uri

    subset = {m: stores[m] for m in ("m00", "m04")}
    config = FederatedConfig(rounds=2, clients_per_round=2, dp=True, noise_multiplier=0.5, clip=1.0, seed=3)
    seen = []
    outcome = run_federated(settings, subset, config, MODEL, register_every=1, personalize=False,
                            on_round=lambda r, res: seen.append(r))
    assert seen == [1, 2] and outcome.versions == ["1", "2"]
    client = MlflowClient(tracking_uri(settings), registry_uri=tracking_uri(settings))
    steps = client.get_metric_history(outcome.run_id, "eval_auc")
    assert [m.step for m in steps] == [1, 2]
    assert client.get_metric_history(outcome.run_id, "dp_epsilon")[-1].value == pytest.approx(outcome.privacy["dp_epsilon"])
    tags = client.get_run(outcome.run_id).data.tags
    assert "dp_sampling" in tags and "dp_guarantee" in tags
    from federated.runner import dp_verdict

    assert tags["dp_sampling"].startswith("poisson") and "OS entropy" in tags["dp_sampling"]
    assert "Poisson-subsampled" in tags["dp_accounting"] and "amplified" in tags["dp_accounting"]
    assert tags["dp_guarantee"] == dp_verdict(outcome.privacy["dp_epsilon"], settings.federated.meaningful_epsilon)
    version = client.get_model_version(MODEL_NAME, "2")
    lineage = version_lineage(version)
    assert lineage["rounds"] == 2 and lineage["merchants_per_round"] == 2 and lineage["dp"] is True
    assert lineage["dp_epsilon"] == pytest.approx(outcome.privacy["dp_epsilon"]) and lineage["dp_delta"] == 1e-5
    assert lineage["data_period"]["start"] < lineage["data_period"]["end"]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert any(a.startswith("keras-round") for a in artifacts) or len(client.search_logged_models(
        experiment_ids=[client.get_run(outcome.run_id).info.experiment_id])) >= 2
    bundle = load_bundle(settings, f"models:/{MODEL_NAME}/2")
    held, held_small = subset["m00"].load("heldout"), subset["m04"].load("heldout")
    np.testing.assert_allclose(bundle.model.predict_proba_many(held["indices"], held["values"]),
                               outcome.scorer.predict_proba_many(held["indices"], held["values"]), rtol=1e-6)
    assert lineage["training_run_id"] == outcome.run_id
    recommended = bundle.recommend("m00", "u0001", k=5)  # ranks the merchant's published catalog
    assert len(recommended) == 5 and {item for item, _ in recommended} <= set(subset["m00"].catalog())
    assert all(0 < p < 1 for _, p in recommended) and bundle.recommend("m99", "u0001", k=5) == []
    rows = compare_merchants(subset, MODEL, outcome.scorer, PersonalizationConfig(local_epochs=1, finetune_epochs=1))
    assert [r["merchant_id"] for r in rows] == ["m00", "m04"]
    for row in rows:
        assert all(0 <= row[f"{m}_auc"] <= 1 and row[f"{m}_logloss"] > 0 for m in ("local", "global", "finetuned"))
    assert row["global_auc"] == pytest.approx(auc(held_small["labels"], outcome.scorer.predict_proba_many(
        held_small["indices"], held_small["values"])))
    summary = summarize(rows, small=1000)
    assert summary["merchants"] == 2 and summary["small_merchants"] == 1


def test_cli_run_in_a_real_process_and_bad_options(tmp_path):
    """The real console command, in its own process: it must exit and release its pipes (worker stopped)."""
    import subprocess
    import sys

    from click.testing import CliRunner

    from fedstream.cli import main

    env = {**os.environ, "FEDSTREAM_DATA_DIR": str(tmp_path / "data"), "FEDSTREAM_FEATURE_BITS": "14",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "fedstream", "federated", "run", "--source", "generate", "--rounds", "2",
               "--clients-per-round", "3", "--events", "4000", "--generate-merchants", "4", "--no-personalize", "--server-optimizer", "sgd",
               "--server-lr", "1.0"]
    # capture_output: a leftover worker_binary would hold the pipes open and this would time out
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["versions"] == ["1"] and summary["final_eval"]["auc"] > 0.5
    assert sorted(p.name for p in (tmp_path / "data" / "federated" / "merchants").iterdir()) == ["m00", "m01", "m02", "m03"]
    # a DP run whose ε means nothing says so, before training and in its summary (the ε ~ 222)
    dp = subprocess.run([*command[:5], "--source", "stores", "--rounds", "3", "--clients-per-round", "3",
                         "--no-personalize", "--dp", "--noise-multiplier", "0.1", "--clip", "1.0"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert dp.returncode == 0, dp.stderr[-3000:]
    dp_summary = json.loads(dp.stdout.strip().splitlines()[-1])
    assert dp_summary["dp_epsilon"] > 100 and dp_summary["dp_guarantee"].startswith("none: epsilon")
    assert dp.stderr.count("WARNING: DP guarantee none") == 2 and "no meaningful privacy guarantee" in dp.stderr
    runner = CliRunner()
    bad = runner.invoke(main, ["federated", "run", "--dp", "--rounds", "1"], env={"FEDSTREAM_DATA_DIR": str(tmp_path)})
    assert bad.exit_code == 2 and "noise multiplier" in bad.output
    no_broker = runner.invoke(main, ["federated", "run", "--source", "kafka", "--merchants", "m00"], env={"FEDSTREAM_DATA_DIR": str(tmp_path)})
    assert no_broker.exit_code == 1 and "broker" in no_broker.output.lower()  # one line, no traceback
    bad_merchants = runner.invoke(main, ["federated", "run", "--merchants", " , "], env={"FEDSTREAM_DATA_DIR": str(tmp_path)})
    assert bad_merchants.exit_code == 2
    no_stores = runner.invoke(main, ["federated", "run", "--source", "stores"], env={"FEDSTREAM_DATA_DIR": str(tmp_path / "empty")})
    assert no_stores.exit_code == 1 and "no merchant stores" in no_stores.output
    help_text = runner.invoke(main, ["federated", "run", "--help"]).output
    assert "--clients-per-round" in help_text and "--secure-agg" in help_text


def test_rounds_across_three_joined_workers_over_loopback(tff_module, tmp_path):
    """`fedstream federated join` x3 (real processes, each with its own worker_binary), coordinator rounds on them
    give the same model as the same rounds in the local context; stopping a join stops its worker."""
    import signal
    import subprocess
    import sys

    from federated.remote import joined_workers
    from federated.runner import run_federated
    from fedstream.settings import load_settings

    settings = load_settings(data_dir=tmp_path / "data", feature_bits=BITS)
    stores = build_stores(generate(GeneratorConfig(merchants=3, events=3000, seed=9)), settings.data_path / "federated",
                          bits=BITS)
    env = {**os.environ, "FEDSTREAM_DATA_DIR": str(settings.data_path)}
    from federated.certs import default_dir, make_federation

    make_federation(default_dir(settings), ["127.0.0.1"], days=1)  # joins serve mTLS; the coordinator dials with it
    joins = [subprocess.Popen([sys.executable, "-m", "fedstream", "federated", "join", "--merchant", m],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for m in sorted(stores)]
    try:
        records = [json.loads(p.stdout.readline()) for p in joins]
        assert sorted(r["merchant_id"] for r in records) == ["m00", "m01", "m02"] and all(r["tls"] for r in records)
        workers = joined_workers(settings)
        assert [w.merchant_id for w in workers] == ["m00", "m01", "m02"]
        config = FederatedConfig(rounds=2, clients_per_round=2, server_optimizer="sgd", server_learning_rate=1.0)
        remote = run_federated(settings, stores, config, MODEL, personalize=False, track=False, workers=workers)
        assert remote.context == "remote_workers[3]"
        assert all(r.participants == ["m00", "m01", "m02"] for r in remote.history)
        assert remote.history[-1].evaluation["num_examples"] == sum(s.count("heldout") for s in stores.values())
        local = run_federated(settings, stores, FederatedConfig(rounds=2, clients_per_round=3, server_optimizer="sgd",
                                                                server_learning_rate=1.0),
                              MODEL, personalize=False, track=False)
        for name, value in local.scorer.weights.items():
            np.testing.assert_allclose(remote.scorer.weights[name], value, atol=1e-5)
        with pytest.raises(ValueError, match="not --dp"):
            run_federated(settings, stores, FederatedConfig(dp=True, noise_multiplier=0.1, clip=1.0), MODEL,
                          personalize=False, track=False, workers=workers)
    finally:
        for proc in joins:
            proc.send_signal(signal.SIGTERM)
        for proc in joins:
            assert proc.wait(timeout=20) == 0
            proc.stdout.close()
    worker_pids = [r["pid"] for r in records]
    assert not any(os.path.exists(f"/proc/{pid}/cmdline") and open(f"/proc/{pid}/cmdline", "rb").read()
                   for pid in worker_pids)
    assert joined_workers(settings) == []
