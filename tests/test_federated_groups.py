"""Merchant groups (federated.groups): a round run as a few TFF clients, each training a group of merchants,
gives the same global model and metrics as one TFF client per merchant (touched mean, plain mean, --clip,
FedProx with a server optimizer, fixed-clip DP), and runs where it applies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from federated.groups import (
    GroupedEvaluation, GroupedProcess, build_round_evaluation, build_round_process, per_merchant_reason, split_groups,
)
from federated.model import ModelConfig
from federated.stores import build_stores, open_stores, write_store
from federated.training import (
    FederatedConfig, FederatedData, build_evaluation, build_process, client_seed, evaluate_federated, run_rounds,
)
from streams.generator import GeneratorConfig, generate

pytestmark = pytest.mark.slow
BITS = 14


@pytest.fixture(scope="module")
def clients(tmp_path_factory):
    """``(folder, seed)`` of 6 small merchants (the training tests' stores), as a round hands them to TFF."""
    root = tmp_path_factory.mktemp("groups")
    data = FederatedData.from_stores(build_stores(generate(GeneratorConfig(merchants=6, events=9000, seed=3)), root,
                                                  bits=BITS))
    return [(data.train[m](), client_seed(7, 1, m)) for m in data.client_ids]


@pytest.fixture(scope="module")
def model_fn():
    from federated.model import tff_model_fn

    return tff_model_fn(ModelConfig(bits=BITS))


def _one_round(process, clients):
    output = process.next(process.initialize(), clients)
    weights = process.get_model_weights(output.state)
    return [np.asarray(w) for w in weights.trainable], output.metrics["client_work"]["train"]


def test_groups_split_a_cohort_in_order_and_never_into_nothing():
    clients = [(f"f{k}", k) for k in range(7)]
    groups = split_groups(clients, 3)
    assert [len(f) for f, _ in groups] in ([2, 3, 2], [3, 2, 2], [2, 2, 3])
    assert [f for fs, _ in groups for f in fs] == [f for f, _ in clients]  # every merchant once, in order
    assert [s for _, ss in groups for s in ss] == list(range(7))
    assert split_groups(clients[:2], 5) == [(["f0"], [0]), (["f1"], [1])]  # no empty group beside others
    assert split_groups([], 4) == [([], [])]  # a DP round with nobody sampled still runs (its noise is released)


@pytest.mark.parametrize("options", [
    {"aggregation": "touched", "client_groups": 4},  # groups of 1 and 2 merchants
    {"aggregation": "mean"},
    {"clip": 0.5},  # each merchant's update clipped before it enters its group's sums
    {"prox_mu": 0.1, "server_optimizer": "adam", "server_learning_rate": 0.05},
], ids=["touched", "mean", "clip", "prox-adam"])
def test_a_grouped_round_equals_one_client_per_merchant(tff_module, model_fn, clients, options):
    config = FederatedConfig(rounds=1, **{"client_groups": 2, **options})
    per_merchant, per_metrics = _one_round(build_process(model_fn, config), clients)
    grouped_process = GroupedProcess(model_fn, config)
    assert grouped_process.groups == config.client_groups
    grouped, metrics = _one_round(grouped_process, clients)
    assert max(float(np.abs(w).max()) for w in per_merchant) > 0.01  # the round moved the model
    for a, b in zip(per_merchant, grouped):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-7)
    assert set(metrics) == set(per_metrics)
    for key in per_metrics:
        assert float(metrics[key]) == pytest.approx(float(per_metrics[key]), rel=1e-4), key  # float32 sums
    assert float(metrics["num_examples"]) > 1000


def test_fixed_clip_dp_in_groups_is_the_per_merchant_dp_mean_with_the_same_noise_scale(tff_module, model_fn, clients):
    """Noise ~0: the grouped and per-merchant DP means agree; noise on: the coordinates no merchant moved hold
    only the server's noise, of std noise_multiplier x clip / clients_per_round in both processes."""
    quiet = FederatedConfig(rounds=1, clients_per_round=6, dp=True, noise_multiplier=1e-9, clip=0.5, client_groups=2)
    expected, _ = _one_round(build_process(model_fn, quiet), clients)
    grouped, _ = _one_round(GroupedProcess(model_fn, quiet), clients)
    for a, b in zip(expected, grouped):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
    noisy = dataclasses.replace(quiet, noise_multiplier=2.0)
    untouched = np.abs(grouped[0][:, 0]) < 1e-7  # only the ~1e-10 noise there
    assert untouched.sum() > 5_000  # the wide slots nobody's examples hit
    sigma = noisy.noise_multiplier * noisy.clip / noisy.clients_per_round
    stds = {}
    for name, process in (("per_merchant", build_process(model_fn, noisy)), ("grouped", GroupedProcess(model_fn, noisy))):
        weights, _ = _one_round(process, clients)
        stds[name] = float(np.std(weights[0][:, 0][untouched]))
    assert stds["grouped"] == pytest.approx(sigma, rel=0.05), stds
    assert stds["per_merchant"] == pytest.approx(sigma, rel=0.05), stds


def test_groups_apply_where_the_aggregate_is_a_sum_of_merchant_terms(tff_module, model_fn, clients):
    assert per_merchant_reason(FederatedConfig()) is None  # the default: groups
    assert "client_groups" in per_merchant_reason(FederatedConfig(client_groups=1))
    assert "secure" in per_merchant_reason(FederatedConfig(secure_agg=True))
    assert "adaptive" in per_merchant_reason(FederatedConfig(dp=True, noise_multiplier=0.5, clients_per_round=10))
    assert per_merchant_reason(FederatedConfig(dp=True, noise_multiplier=0.5, clip=1.0)) is None
    with pytest.raises(ValueError, match="client_groups"):
        FederatedConfig(client_groups=-1)
    assert not isinstance(build_round_process(model_fn, FederatedConfig(client_groups=0)), GroupedProcess)
    config = FederatedConfig(rounds=2, clients_per_round=4, seed=5)
    process = build_round_process(model_fn, config)
    assert isinstance(process, GroupedProcess)
    data = FederatedData.from_stores({})
    data.train = {f"m{k}": (lambda f=folder: f) for k, (folder, _) in enumerate(clients)}
    state, history = run_rounds(process, process.initialize(), data, config)  # the runner's loop, unchanged
    assert [len(r.participants) for r in history] == [4, 4] and history[-1].train["num_examples"] > 500
    weights = [np.asarray(w) for w in process.get_model_weights(state).trainable]
    assert all(np.isfinite(w).all() for w in weights)
    empty = process.next(state, [])  # nobody in the cohort: one empty group, the touched mean moves nothing
    for before, after in zip(weights, process.get_model_weights(empty.state).trainable):
        np.testing.assert_array_equal(np.asarray(after), before)
    assert float(empty.metrics["client_work"]["train"]["num_examples"]) == 0


def test_federated_run_takes_the_group_count(tmp_path):
    from click.testing import CliRunner

    from federated.runner import tff_clients
    from fedstream.cli import main

    runner = CliRunner()
    help_text = runner.invoke(main, ["federated", "run", "--help"]).output
    assert "--client-groups" in help_text and "one TFF client per" in help_text
    bad = runner.invoke(main, ["federated", "run", "--client-groups", "-1"], env={"FEDSTREAM_DATA_DIR": str(tmp_path)})
    assert bad.exit_code == 2 and "--client-groups" in bad.output
    assert tff_clients(FederatedConfig(), on_workers=False) == "2 merchant groups"
    assert tff_clients(FederatedConfig(secure_agg=True), on_workers=False).startswith("one per merchant (secure")
    assert tff_clients(FederatedConfig(), on_workers=True) == "one merchant per joined worker"


def _heldout_folders(clients, root):
    """The 6 merchants' held-out folders, plus one with a single held-out row and one with none."""
    stores = open_stores(Path(clients[0][0]).parents[2])
    arrays = stores["m00"].load("train")
    tiny = {k: v[:40] for k, v in arrays.items()}
    write_store(root, "tiny", tiny, holdout_fraction=1 / 40, bits=BITS)
    empty = write_store(root, "empty", tiny, holdout_fraction=0.5, bits=BITS)
    empty.write("heldout", {k: v[:0] for k, v in arrays.items()})
    folders = [str(s.split_dir("heldout")) for s in stores.values()]
    small = [str(Path(root) / "merchants" / m / "examples-heldout") for m in ("tiny", "empty")]
    return folders[:3] + small + folders[3:]


@pytest.mark.parametrize("groups", [2, 3], ids=["two-groups", "uneven-groups"])
def test_grouped_evaluation_equals_one_client_per_merchant(tff_module, model_fn, clients, tmp_path, groups):
    """The metrics TFF's build_fed_eval reports for a trained model, from a few group clients instead of one
    client per merchant (8 merchants: 6 stores, one with one held-out row, one with none)."""
    config = FederatedConfig(rounds=1, client_groups=groups)
    process = GroupedProcess(model_fn, config)
    weights = process.get_model_weights(process.next(process.initialize(), clients).state)
    folders = _heldout_folders(clients, tmp_path)
    assert np.load(Path(folders[3]) / "labels.npy").shape[0] == 1 and np.load(Path(folders[4]) / "labels.npy").size == 0
    heldout = {f"m{k}": (lambda f=f: f) for k, f in enumerate(folders)}
    data = FederatedData(train=dict(heldout), heldout=heldout, counts={})
    per_merchant = build_evaluation(model_fn)
    _, expected = evaluate_federated(per_merchant, per_merchant.initialize(), weights, data)
    grouped = build_round_evaluation(model_fn, config)
    assert isinstance(grouped, GroupedEvaluation) and grouped.groups == groups
    _, metrics = evaluate_federated(grouped, grouped.initialize(), weights, data)
    assert set(metrics) == set(expected) and {"auc", "loss", "num_examples"} <= set(metrics)
    assert expected["num_examples"] == sum(np.load(Path(f) / "labels.npy").shape[0] for f in folders)
    assert 0.5 < expected["auc"] < 1 and expected["loss"] > 0  # a trained model, not the initial one
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
    assert not isinstance(build_round_evaluation(model_fn, FederatedConfig(client_groups=1)), GroupedEvaluation)


@pytest.mark.parametrize("config", [FederatedConfig(client_groups=2, secure_agg=True),
                                    FederatedConfig(client_groups=2, dp=True, clip=None, noise_multiplier=0.5, clients_per_round=10)],
                         ids=["secure-aggregation", "adaptive-clip-dp"])
def test_evaluation_is_grouped_where_training_keeps_one_client_per_merchant(model_fn, config):
    """Evaluation sums plain metrics whatever the training aggregator: groups apply to it (the metrics are
    the per-merchant ones, test above), while training keeps one client per merchant."""
    assert per_merchant_reason(config) is not None
    assert isinstance(build_round_evaluation(model_fn, config), GroupedEvaluation)


def _update_norm(process, client) -> float:
    """L2 distance of one merchant's local model from the broadcast weights: a one-client round with the
    plain mean and server SGD at rate 1 sets the global model to exactly that local model."""
    state = process.initialize()
    before = [np.asarray(w, np.float64) for w in process.get_model_weights(state).trainable]
    output = process.next(state, [client])
    after = process.get_model_weights(output.state).trainable
    return float(np.sqrt(sum(np.sum((np.asarray(a, np.float64) - b) ** 2) for a, b in zip(after, before))))


@pytest.mark.parametrize("dp", [False, True], ids=["weighted", "dp-unweighted"])
@pytest.mark.parametrize("build", [build_process, GroupedProcess], ids=["per-merchant", "grouped"])
def test_fedprox_keeps_every_merchants_update_closer_to_the_global_model_than_fedavg(tff_module, model_fn, clients,
                                                                                     build, dp):
    """FedProx (Li et al. 2020) trains F_k(w) + (mu/2)||w - w_global||^2: with a large mu and a few local steps each
    merchant's local model must end *nearer* the broadcast weights than plain FedAvg's on the same batches.
    (TFF 0.87's proximal client work adds mu * (w_global - w) instead, pushing it away: it failed here.)"""
    fedavg = FederatedConfig(rounds=1, aggregation="mean", client_learning_rate=0.1, client_epochs=2)
    if dp:  # fixed-clip DP of one client, clip far above the update and no noise: the mean is the update itself
        fedavg = dataclasses.replace(fedavg, dp=True, noise_multiplier=1e-9, clip=1e3, clients_per_round=1)
    fedprox = dataclasses.replace(fedavg, prox_mu=5.0)
    avg_process, prox_process = build(model_fn, fedavg), build(model_fn, fedprox)
    for client in clients[:3]:
        avg, prox = _update_norm(avg_process, client), _update_norm(prox_process, client)
        assert 0 < prox < 0.9 * avg, (client, prox, avg)


def test_the_proximal_term_is_the_gradient_of_half_mu_times_the_squared_distance_to_the_global_model(tff_module):
    import tensorflow as tf

    from federated.proximal import proximal_gradients

    rng = np.random.default_rng(0)
    initial = [tf.constant(rng.normal(size=(5, 1)), tf.float32), tf.constant(rng.normal(size=(3,)), tf.float32)]
    current = [tf.Variable(w + rng.normal(size=w.shape).astype(np.float32)) for w in initial]
    with tf.GradientTape() as tape:
        penalty = 2.5 * tf.add_n([tf.reduce_sum((w - w0) ** 2) for w, w0 in zip(current, initial)])  # (mu/2)||.||^2
    expected = tape.gradient(penalty, current)
    zero = [tf.zeros_like(w) for w in initial]
    for got, want in zip(proximal_gradients(zero, current, initial, 5.0), expected):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6)


def test_grouped_evaluation_of_a_multitask_model_equals_one_client_per_merchant(tff_module, tmp_path):
    """Two label columns ([clicked, ordered]): the purchase metrics too."""
    from federated.model import tff_model_fn

    stores = build_stores(generate(GeneratorConfig(merchants=4, events=8000, seed=3)), tmp_path, bits=12,
                          attribution_window_s=86400)
    model_config = ModelConfig(bits=12, multitask=True)
    model_fn, width = tff_model_fn(model_config), model_config.label_width
    data = FederatedData.from_stores(stores)
    process = GroupedProcess(model_fn, FederatedConfig(rounds=1), width)
    clients = [(data.train[m](), client_seed(7, 1, m)) for m in data.client_ids]
    weights = process.get_model_weights(process.next(process.initialize(), clients).state)
    per_merchant, grouped = build_evaluation(model_fn, width), GroupedEvaluation(model_fn, 2, width)
    _, expected = evaluate_federated(per_merchant, per_merchant.initialize(), weights, data)
    _, metrics = evaluate_federated(grouped, grouped.initialize(), weights, data)
    assert set(metrics) == set(expected) and expected["purchase_auc"] > 0.5
    for key in expected:
        assert metrics[key] == pytest.approx(expected[key], rel=1e-5), key
