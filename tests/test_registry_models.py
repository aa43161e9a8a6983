"""Registry API and `fedstream models` CLI against a real MLflow sqlite store (private per test)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from registry.models import (
    AlreadyRegistered, MetricPolicy, RegistryError, alias_history, champion_version, latest_version, list_versions, load_bundle,
    promote, register_version, resolve, rollback, version_lineage,
)
from registry.tracking import activate, client
from tests.test_registry_bundle import T0, click_frame, make_bundle, make_clicks

NAME = "fedstream-ctr"


def register(settings, logloss: float, events: int = 5000, **kwargs):
    return register_version(settings, make_bundle(f"logloss {logloss}"), name=NAME,
                            metrics={"prequential_logloss": logloss, "window_events": events},
                            lineage={"offsets": {"fedstream.clicks/0": events}, "events_seen": events,
                                     "merchants": ["m1", "m2"]}, **kwargs)


def test_register_logs_a_loadable_version_with_challenger_alias_metrics_and_lineage(settings):
    version = register(settings, 0.42)
    assert str(version.version) == "1" and "challenger" in version.aliases
    assert version.tags["metric.prequential_logloss"] == "0.42"
    assert json.loads(version.tags["lineage.offsets"]) == {"fedstream.clicks/0": 5000}
    run = client(settings).get_run(version.run_id)
    assert run.data.metrics["prequential_logloss"] == pytest.approx(0.42)
    assert run.info.experiment_id == client(settings).get_experiment_by_name(settings.mlflow_experiment).experiment_id

    bundle = load_bundle(settings, f"models:/{NAME}@challenger")
    clicks = make_clicks(20, seed=3)
    np.testing.assert_allclose(bundle.predict(clicks), make_bundle().predict(clicks), rtol=1e-6)
    import mlflow.pyfunc

    with activate(settings):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    np.testing.assert_allclose(pyfunc.predict(click_frame(clicks)), bundle.predict(clicks), rtol=1e-6)


def test_latest_version_is_the_highest_number_with_its_tags_whatever_the_aliases(settings):
    assert latest_version(settings, NAME) is None  # no model registered yet
    register(settings, 0.40, events=100)
    register(settings, 0.45, events=200)
    promote(settings, NAME, "1", force=True)
    latest = latest_version(settings, NAME)
    assert str(latest.version) == "2" and version_lineage(latest)["events_seen"] == 200
    assert latest_version(settings, "no-such-model") is None

    # unless_latest: no version when the latest one's lineage already has these values
    with pytest.raises(AlreadyRegistered, match="version 2 already holds") as held:
        register(settings, 0.45, events=300, unless_latest={"events_seen": 200, "merchants": ["m1", "m2"]})
    assert str(held.value.version.version) == "2" and str(latest_version(settings, NAME).version) == "2"
    assert str(register(settings, 0.45, events=300, unless_latest={"events_seen": 300}).version) == "3"


def test_promotion_policy_first_version_then_only_better_ones_then_rollback(settings):
    register(settings, 0.45)
    first = promote(settings, NAME)
    assert first.moved and first.version == "1" and first.previous is None
    assert promote(settings, NAME).reason == "already champion"

    register(settings, 0.47)  # worse
    worse = promote(settings, NAME)
    assert not worse.moved and "not better" in worse.reason and resolve(settings, NAME) == "1"

    register(settings, 0.40, events=10)  # better, but measured on too few events
    thin = promote(settings, NAME)
    assert not thin.moved and "min_events" in thin.reason

    register(settings, 0.41)  # better
    better = promote(settings, NAME)
    assert better.moved and better.version == "4" and better.previous == "1"
    assert str(champion_version(settings, NAME).version) == "4"

    forced = promote(settings, NAME, version=2, force=True)
    assert forced.moved and forced.reason.startswith("forced")

    assert rollback(settings, NAME).version == "4"
    assert rollback(settings, NAME).version == "1"
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(settings, NAME)

    actions = [(h["action"], h["alias"], h["version"]) for h in alias_history(settings, NAME)]
    assert actions[:2] == [("register", "challenger", "1"), ("promote", "champion", "1")]
    assert actions[-2:] == [("rollback", "champion", "4"), ("rollback", "champion", "1")]
    rows = list_versions(settings, NAME)
    assert [r["version"] for r in rows] == ["4", "3", "2", "1"]
    assert rows[-1]["aliases"] == ["champion"] and rows[0]["aliases"] == ["challenger"]
    assert rows[0]["metrics"]["prequential_logloss"] == pytest.approx(0.41)


def test_custom_policies_and_bad_requests(settings):
    with pytest.raises(RegistryError, match="no registered model"):
        promote(settings, NAME)
    register(settings, 0.5)
    assert promote(settings, NAME, policy=lambda candidate, champion: MetricPolicy().decide({}, {})).moved is False
    with pytest.raises(RegistryError, match="no version 9"):
        promote(settings, NAME, version=9)
    with pytest.raises(RegistryError, match="no champion"):
        rollback(settings, NAME)
    strict = MetricPolicy(min_improvement=0.05)
    assert not strict.decide({"prequential_logloss": 0.48, "window_events": 1e4}, {"prequential_logloss": 0.5}).promote
    auc_policy = MetricPolicy(metric="auc", greater_is_better=True)
    assert auc_policy.decide({"auc": 0.8, "events_seen": 1}, {"auc": 0.7}).promote


def test_registering_into_a_workers_running_run_keeps_it_running(settings):
    from registry.tracking import experiment_id

    mlflow_client = client(settings)
    run = mlflow_client.create_run(experiment_id(settings), run_name="online-worker")
    version = register(settings, 0.44, run_id=run.info.run_id)
    assert version.run_id == run.info.run_id
    assert mlflow_client.get_run(run.info.run_id).info.status == "RUNNING"


def cli(settings, *args):
    from fedstream.cli import main

    env = {"FEDSTREAM_DATA_DIR": str(settings.data_dir), "FEDSTREAM_FEATURE_BITS": str(settings.feature_bits)}
    return CliRunner().invoke(main, ["models", *args], env=env, catch_exceptions=False)


def test_models_cli_lists_promotes_and_rolls_back(settings):
    for command in ([], ["list"], ["promote"], ["rollback"]):
        shown = cli(settings, *command, "--help")
        assert shown.exit_code == 0 and "Usage" in shown.output
    missing = cli(settings, "list")
    assert missing.exit_code != 0 and "no registered model" in missing.output

    register(settings, 0.45)
    register(settings, 0.50)
    assert json.loads(cli(settings, "promote", "--version", "1", "--json").output)["moved"] is True
    refused = json.loads(cli(settings, "promote", "--json").output)
    assert refused["moved"] is False and "not better" in refused["reason"]
    forced = cli(settings, "promote", "--force")
    assert forced.exit_code == 0 and "champion moved" in forced.output
    table = cli(settings, "list")
    assert table.exit_code == 0 and "champion" in table.output and "challenger" in table.output
    rows = json.loads(cli(settings, "list", "--json").output)
    assert [(r["version"], r["aliases"]) for r in rows] == [("2", ["challenger", "champion"]), ("1", [])]
    back = json.loads(cli(settings, "rollback", "--json").output)
    assert back == {**back, "moved": True, "version": "1", "previous": "2"}
    again = cli(settings, "rollback")
    assert again.exit_code == 1 and "no previous champion" in again.output
    assert T0 > 0


def test_a_real_online_learner_and_recommender_round_trip_through_the_registry(settings):
    """The online room's FTRL learner and Recommender, registered and loaded back by alias."""
    import mlflow.pyfunc

    from online.learners import FTRLProximalClassifier
    from online.reco import Recommender
    from registry.bundle import ModelBundle
    from streams.features import Featurizer
    from streams.schemas import LineItem, Order
    from tests.test_registry_bundle import BITS, make_catalog

    context, catalog = make_catalog()
    clicks = make_clicks(3000)
    learner, recommender = FTRLProximalClassifier(bits=BITS, alpha=0.1), Recommender()
    for event in catalog:
        recommender.observe(event)
    indices, values = Featurizer(BITS).transform_many(clicks, context)
    for start in range(0, len(clicks), 100):
        learner.learn_many(indices[start:start + 100], values[start:start + 100],
                           np.array([c.clicked for c in clicks[start:start + 100]]))
    for click in clicks:
        recommender.observe(click)
    bought = Order(event_id="o", order_id="o1", merchant_id="m1", user_id="u1", timestamp=T0 + 3000, currency="EUR",
                   items=[LineItem(item_id="m1-i0", quantity=1, unit_price=5.0)])
    recommender.observe(bought)
    bundle = ModelBundle(model=learner, feature_bits=BITS, context=context, recommender=recommender,
                         description="ftrl + reco", meta={"learner": "FTRLProximalClassifier"})
    register_version(settings, bundle, name=NAME, metrics={"prequential_logloss": 0.4, "window_events": 3000},
                     lineage={"events_seen": 3000, "offsets": {"clicks/0": 3000}})
    promote(settings, NAME)

    loaded = load_bundle(settings, f"models:/{NAME}@champion")
    expected = bundle.recommend("m1", "u1", k=10, timestamp=T0)
    assert loaded.recommend("m1", "u1", k=10, timestamp=T0) == expected
    assert len(expected) == 10 and "m1-i0" not in [item for item, _ in expected]
    held_out = make_clicks(40, seed=8)
    with activate(settings):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    np.testing.assert_allclose(pyfunc.predict(click_frame(held_out)), bundle.predict(held_out), rtol=1e-6)
