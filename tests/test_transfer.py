"""Transfer: learners warm-started from a registered federated version (finetune, features), end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from federated.model import ModelConfig, NumpyScorer
from fedstream.metrics import roc_auc
from fedstream.cli import main
from online.learners import LEARNERS, FTRLProximalClassifier
from online.transfer import ResidualModel, bias_slot, finetune
from registry.bundle import ModelBundle
from streams.features import FeatureContext

BITS = 16
FEDERATED = "fedstream-federated"


def federated_scorer(seed: int = 3) -> NumpyScorer:
    """A wide federated model as the runner registers it (NumpyScorer of averaged weights)."""
    rng = np.random.default_rng(seed)
    weights = {"wide_embeddings": rng.normal(0, 0.4, (1 << BITS, 1)).astype(np.float32),
               "wide_bias": np.array([-0.7], np.float32)}
    return NumpyScorer(ModelConfig(bits=BITS), weights)


def register_federated(settings) -> str:
    from registry.models import register_version

    bundle = ModelBundle(model=federated_scorer(), feature_bits=BITS, context=FeatureContext(), kind="federated",
                         description="federated global model (test)")
    version = register_version(settings, bundle, name=FEDERATED, metrics={"eval_auc": 0.7},
                               lineage={"rounds": 3, "merchants": 4}, run_id=None)
    return str(version.version)


def _batch(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, 1 << BITS, (n, 6)).astype(np.int32)
    indices[:, 0] = bias_slot(BITS)
    return indices, np.ones(indices.shape, np.float32), rng.random(n) < 0.3


def _env(settings) -> dict[str, str]:
    """The CLI's environment for ``settings`` (its data dir, broker, topics and feature bits)."""
    env = {"FEDSTREAM_BOOTSTRAP_SERVERS": settings.bootstrap_servers, "FEDSTREAM_DATA_DIR": str(settings.data_path),
           "FEDSTREAM_FEATURE_BITS": str(BITS)}
    for kind in ("clicks", "orders", "catalog", "dead_letter", "drift"):
        topic = getattr(settings.topics, kind)
        env[f"FEDSTREAM_TOPICS__{kind.upper()}__NAME"] = topic.name
        env[f"FEDSTREAM_TOPICS__{kind.upper()}__PARTITIONS"] = str(topic.partitions)
    return env


def _learn(settings, tmp_path, uri: str, method: str) -> dict:
    """Generated events into the test's topics, then ``fedstream learn --warm-start uri --transfer method``
    until the stream is idle; the command's summary line."""
    from streams.generator import GeneratorConfig, generate
    from streams.producer import EventProducer

    with EventProducer(settings, source="test-transfer") as producer:
        for event in generate(GeneratorConfig(merchants=2, events=1500, seed=17)):
            producer.send_event(event)
    args = ["learn", "--model", "ftrl", "--group", "warm", "--checkpoint", str(tmp_path / "warm.ckpt"),
            "--idle-timeout", "3", "--publish-every", "0", "--no-drift", "--rank-every", "0",
            "--warm-start", uri, "--transfer", method]
    result = CliRunner().invoke(main, args, env=_env(settings))
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(LEARNERS))
def test_finetune_starts_at_the_global_predictions(name):
    scorer = federated_scorer()
    model = finetune(LEARNERS[name](bits=BITS, **({"l1": 0.5} if name == "ftrl" else {})), scorer, BITS)
    indices, values, _ = _batch(1)
    assert np.allclose(model.predict_proba_many(indices, values), scorer.predict_proba_many(indices, values), atol=1e-5)


def test_finetuned_ftrl_is_pulled_towards_the_global_weights_not_towards_zero():
    scorer = federated_scorer()
    warm = finetune(FTRLProximalClassifier(bits=BITS, l2=1.0), scorer, BITS)
    cold = FTRLProximalClassifier(bits=BITS, l2=1.0)
    indices, values, y = _batch(2, 50)
    warm.learn_many(indices, values, y)
    cold.learn_many(indices, values, y)
    touched = np.unique(indices[:, 1:])
    global_w = scorer.weights["wide_embeddings"][touched, 0]
    # after a little data the warm learner stays near the global weights, the cold one near 0
    assert np.abs(warm.w[touched] - global_w).mean() < 0.5 * np.abs(global_w).mean()
    assert np.corrcoef(warm.w[touched], global_w)[0, 1] > 0.9
    untouched = np.setdiff1d(np.arange(1 << BITS), indices)[:100]
    assert np.allclose(warm.w[untouched], scorer.weights["wide_embeddings"][untouched, 0], atol=1e-6)


def test_features_model_starts_as_the_global_one_and_exports_an_equal_linear_model():
    scorer = federated_scorer()
    model = ResidualModel(FTRLProximalClassifier(bits=BITS), scorer)
    indices, values, y = _batch(3)
    before = model.learn_many(indices, values, y)
    first = slice(0, model.head.max_delay)  # the first chunk is predicted before any update: a = 1, w = 0
    assert np.allclose(before[first], scorer.predict_proba_many(indices, values)[first], atol=1e-6)
    assert model.scale != 1.0  # a is learned
    weights, bias = model.linear_terms()
    test_indices, test_values, _ = _batch(4)
    linear = 1 / (1 + np.exp(-(bias + weights[test_indices].sum(axis=1))))
    assert np.allclose(linear, model.predict_proba_many(test_indices, test_values), atol=1e-6)


def test_learn_warm_started_from_a_federated_version_end_to_end(kafka_settings, tmp_path):
    from registry.models import load_bundle, version_lineage
    from registry.tracking import client

    settings = kafka_settings
    source_version = register_federated(settings)
    summary = _learn(settings, tmp_path, f"models:/{FEDERATED}@challenger", "finetune")
    assert summary["clicks"] > 500 and summary["published_versions"] == ["1"]

    name = settings.serving.model_name
    version = client(settings).get_model_version(name, "1")
    assert version.tags["kind"] == "online"
    lineage = version_lineage(version)
    assert lineage["transfer"] == "finetune" and lineage["source_model"] == FEDERATED
    assert str(lineage["source_version"]) == source_version and lineage["source_kind"] == "federated"
    assert lineage["warm_start"] == f"models:/{FEDERATED}@challenger"

    published = load_bundle(settings, f"models:/{name}/1").model.weights
    start = federated_scorer().weights["wide_embeddings"][:, 0].copy()
    start[bias_slot(BITS)] += -0.7
    unchanged = np.isclose(published, start, atol=1e-6)
    assert unchanged.mean() > 0.95  # every slot no click touched still holds the federated weight
    assert not unchanged[bias_slot(BITS)]  # ...and the learner did learn from there


def test_warm_start_errors_are_one_line(settings):
    runner = CliRunner()
    assert "--warm-start" in runner.invoke(main, ["learn", "--help"]).output
    env = {"FEDSTREAM_DATA_DIR": str(settings.data_path), "FEDSTREAM_FEATURE_BITS": str(BITS)}
    bad_uri = runner.invoke(main, ["learn", "--warm-start", "runs:/x", "--max-events", "1"], env=env)
    assert bad_uri.exit_code != 0 and "models:/NAME@ALIAS" in bad_uri.output and "Traceback" not in bad_uri.output
    register_federated(settings)
    river = runner.invoke(main, ["learn", "--model", "river-ftrl", "--warm-start", f"models:/{FEDERATED}@challenger"],
                          env=env)
    assert river.exit_code != 0 and "ftrl, adam, sgd" in river.output
    other_bits = runner.invoke(main, ["learn", "--warm-start", f"models:/{FEDERATED}@challenger"],
                               env={**env, "FEDSTREAM_FEATURE_BITS": "18"})
    assert other_bits.exit_code != 0 and "feature bits" in other_bits.output


def test_worker_starts_a_features_model_and_publishes_it_as_one_linear_scorer(settings, tmp_path):
    from online import publishing
    from online.worker import OnlineWorker, WorkerConfig

    source_version = register_federated(settings)
    config = WorkerConfig(model="ftrl", warm_start=f"models:/{FEDERATED}@challenger", transfer="features",
                          checkpoint_path=tmp_path / "features.ckpt", publish_every_s=None)
    worker = OnlineWorker(settings, config)
    assert isinstance(worker.state.model, ResidualModel) and worker.state.model.scale == 1.0
    snapshot = publishing.snapshot(worker.state, worker.config, worker.metrics())
    assert snapshot["lineage"]["transfer"] == "features" and snapshot["lineage"]["source_version"] == source_version
    exported = snapshot["bundle"].model
    assert type(exported).__name__ == "LinearScorer"  # a·G + w over the slots, as serving ranks it
    indices, values, _ = _batch(5)
    assert np.allclose(exported.predict_proba_many(indices, values),
                       federated_scorer().predict_proba_many(indices, values), atol=1e-5)


def deep_scorer(seed: int = 5, hidden: int = 16) -> NumpyScorer:
    """A wide & deep federated model as the runner registers it (NumpyScorer of its Keras weights)."""
    rng = np.random.default_rng(seed)
    config = ModelConfig(bits=BITS, deep=True, hidden=hidden)
    weights = {"wide_embeddings": rng.normal(0, 0.2, (1 << BITS, 1)), "wide_bias": np.array([-0.7]),
               "deep_bag_embeddings": rng.normal(0, 0.3, (1 << BITS, config.embedding_dim)),
               "deep_hidden_kernel": rng.normal(0, 0.6, (config.embedding_dim, hidden)),
               "deep_hidden_bias": np.zeros(hidden), "deep_out_kernel": rng.normal(0, 0.5, (hidden, 1)),
               "deep_out_bias": np.zeros(1)}
    return NumpyScorer(config, weights)


def test_a_deep_extractor_hands_the_learner_its_hidden_layer_and_the_learner_uses_it(settings):
    scorer = deep_scorer()
    indices, values, _ = _batch(6, 3000)
    hidden = scorer.hidden_many(indices, values)
    assert hidden.shape == (3000, 16) and (hidden > 0).any(axis=0).sum() >= 8  # live ReLU units
    # labels from one hidden unit that the global logit barely carries: only the hidden inputs can learn it
    unit = int(np.argmin(np.abs(scorer.weights["deep_out_kernel"][:, 0]) / (hidden.std(axis=0) + 1e-9) +
                         100.0 * (hidden.std(axis=0) < 1e-3)))
    z = 3.0 * (hidden[:, unit] - hidden[:, unit].mean()) / hidden[:, unit].std()
    y = np.random.default_rng(7).random(3000) < 1 / (1 + np.exp(-z))
    models = {layer: ResidualModel(FTRLProximalClassifier(bits=BITS), scorer, hidden=layer == "hidden")
              for layer in ("hidden", "logit")}
    assert models["hidden"].extractor_layer == "logit+deep_hidden[16]" and models["logit"].extractor_layer == "logit"
    first = slice(0, models["hidden"].head.max_delay)  # before any update both start as the global model
    predicted = {layer: np.concatenate([m.learn_many(indices[s:s + 100], values[s:s + 100], y[s:s + 100])
                                        for s in range(0, 3000, 100)]) for layer, m in models.items()}
    global_p = scorer.predict_proba_many(indices, values)
    assert np.allclose(predicted["hidden"][first], global_p[first], atol=1e-6)
    late = slice(1500, 3000)
    auc = {layer: roc_auc(y[late], p[late]) for layer, p in predicted.items()}
    assert auc["hidden"] > auc["logit"] + 0.1, auc
    assert abs(models["hidden"].head.weights[models["hidden"].hidden_slots[unit]]) > 0.1
    with pytest.raises(ValueError, match="whole extractor"):
        federated_scorer().hidden_many(indices, values)
    assert len(ResidualModel(FTRLProximalClassifier(bits=BITS), federated_scorer()).hidden_slots) == 0


def test_a_federated_run_registers_an_extractor_a_learner_starts_from(kafka_settings, tmp_path):
    """CLI end to end: `federated run --register` -> `models promote` -> `learn --warm-start --transfer features`."""
    import os
    import subprocess
    import sys

    from registry.models import load_bundle, version_lineage
    from registry.tracking import client

    settings, name = kafka_settings, "shared-extractor"
    env = {**os.environ, **_env(settings), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [sys.executable, "-m", "fedstream", "federated", "run", "--source", "generate", "--rounds", "1",
               "--clients-per-round", "3", "--events", "2000", "--generate-merchants", "3", "--no-personalize",
               "--register", name]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["model"] == name and run["versions"] == ["1"]
    federated = version_lineage(client(settings).get_model_version(name, "1"))
    assert federated["transfer_methods"] == "finetune,features" and "wide model" in federated["extractor"]
    assert federated["training_run_id"] == run["run_id"] and federated["rounds"] == 1 and federated["merchants"] == 3
    promoted = CliRunner().invoke(main, ["models", "promote", "--name", name, "--force", "--json"], env=_env(settings))
    assert promoted.exit_code == 0, promoted.output

    summary = _learn(settings, tmp_path, f"models:/{name}@champion", "features")
    assert summary["published_versions"] == ["1"]
    published = client(settings).get_model_version(settings.serving.model_name, "1")
    lineage = version_lineage(published)
    assert lineage["transfer"] == "features" and lineage["source_model"] == name
    assert str(lineage["source_version"]) == "1" and lineage["source_kind"] == "federated"
    assert lineage["warm_start"] == f"models:/{name}@champion"
    assert lineage["extractor_layer"] == "logit"  # a wide source: its logit is the whole extractor
    # the frozen extractor is inside the published model: where no local feature fired, weight = a * global
    weights = load_bundle(settings, f"models:/{settings.serving.model_name}/1").model.weights
    global_weights, _ = load_bundle(settings, f"models:/{name}/1").model.linear_terms()
    fired = np.abs(global_weights) > 1e-3
    ratio = weights[fired] / global_weights[fired]
    assert np.mean(np.isclose(ratio, np.median(ratio), rtol=1e-4)) > 0.5 and np.median(ratio) > 0.1
