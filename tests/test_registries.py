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
