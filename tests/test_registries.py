"""One declaration per kind of thing: event types, learners and aggregations each drive every list of them."""

from __future__ import annotations

import itertools

import pytest

import streams.schemas as schemas
from fedstream.settings import Topics
from streams.schemas import EVENT_KINDS, EVENT_TYPES, event_topic_names, event_topics

_groups = itertools.count()


def test_event_declaration_covers_the_event_topics_and_the_decoder():
    assert list(EVENT_TYPES) == [kind.tag for kind in EVENT_KINDS] == ["click", "order", "catalog"]
    non_event = {"dead_letter", "drift"}
    assert {kind.topic for kind in EVENT_KINDS} == set(Topics.model_fields) - non_event
    topics = Topics()
    assert event_topic_names(topics) == [topics.clicks.name, topics.orders.name, topics.catalog.name]
    assert set(schemas.Event.__args__) == set(EVENT_TYPES.values())  # the decoder's union is the declared set


def test_producer_routes_and_consumer_defaults_follow_the_declaration(kafka_settings, monkeypatch):
    from streams.consumer import EventConsumer
    from streams.producer import EventProducer

    topics = kafka_settings.topics
    with EventProducer(kafka_settings) as producer:
        assert producer.routes == {kind.tag: getattr(topics, kind.topic).name for kind in EVENT_KINDS}
    consumer = EventConsumer(kafka_settings, f"registries-{next(_groups)}", handle_signals=False)
    try:
        assert consumer.topics == event_topic_names(topics)
    finally:
        consumer.close()
    # the declaration drives them: a narrower declaration narrows routing and the default topics with it
    monkeypatch.setattr(schemas, "EVENT_KINDS", EVENT_KINDS[:2])
    with EventProducer(kafka_settings) as producer:
        assert producer.routes == {"click": topics.clicks.name, "order": topics.orders.name}
    assert list(event_topics(topics)) == ["click", "order"]


def test_serving_openapi_lists_every_declared_event_type(settings):
    from serving.app import create_app

    spec = create_app(settings, poll=False).openapi()
    assert {struct.__name__ for struct in EVENT_TYPES.values()} <= set(spec["components"]["schemas"])
    body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = [item["$ref"] for item in body["properties"]["events"]["items"]["oneOf"]]
    assert refs == [f"#/components/schemas/{struct.__name__}" for struct in EVENT_TYPES.values()]


def test_every_registered_learner_is_a_cli_choice_and_builds():
    import numpy as np
    from click.testing import CliRunner

    from online.commands import learn
    from online.learners import LEARNERS
    from online.river_models import MODELS, make_model

    (model_option,) = [p for p in learn.params if p.name == "model"]
    assert list(model_option.type.choices) == list(MODELS)
    assert set(LEARNERS) <= set(MODELS) and len(MODELS) == 10
    from streams.features import FIELDS

    rows = np.random.default_rng(5).integers(0, 256, (4, len(FIELDS)), dtype=np.int32)  # featurizer-shaped
    values = np.ones(rows.shape, dtype=np.float32)
    for name in MODELS:
        model = make_model(name, bits=8)
        assert model.learn_many(rows, values, np.array([True, False, True, False])).shape == (4,), name
        assert model.predict_proba_many(rows, values).shape == (4,), name
    refused = CliRunner().invoke(learn, ["--model", "nope"])
    assert refused.exit_code == 2 and all(name in refused.output for name in MODELS)


def test_aggregation_registry_drives_config_validation_and_cli(monkeypatch):
    import typing

    from click.testing import CliRunner

    from federated import aggregators
    from federated.aggregators import AGGREGATIONS
    from federated.commands import federated
    from federated.training import Aggregation, FederatedConfig

    assert list(AGGREGATIONS) == ["touched", "mean"]
    assert typing.get_args(Aggregation) == tuple(AGGREGATIONS)
    run = federated.commands["run"]
    (option,) = [p for p in run.params if p.name == "aggregation"]
    assert list(option.type.choices) == list(AGGREGATIONS)
    for name in AGGREGATIONS:
        assert FederatedConfig(aggregation=name).aggregation == name
    with pytest.raises(ValueError, match="aggregation must be touched or mean, got 'median'"):
        FederatedConfig(aggregation="median")
    monkeypatch.setitem(aggregators.AGGREGATIONS, "median", aggregators.plain_mean_factory)  # one new entry...
    assert FederatedConfig(aggregation="median").aggregation == "median"  # ...is valid with no other edit
    refused = CliRunner().invoke(federated, ["run", "--aggregation", "nope"])
    assert refused.exit_code == 2 and "'touched'" in refused.output
