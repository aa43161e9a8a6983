"""Serving API with FastAPI's TestClient on a real MLflow sqlite store, a real trained bundle and real keys."""

from __future__ import annotations

import json
import threading
import time

import msgspec
import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from registry.models import promote, register_version
from serving.app import create_app
from serving.keys import KeyStore, keys_path
from tests.test_registry_bundle import make_bundle, make_clicks

NAME = "fedstream-ctr"


def register(settings, logloss: float, scale: float = 1.0):
    return register_version(settings, make_bundle(f"scale {scale}", scale=scale), name=NAME,
                            metrics={"prequential_logloss": logloss, "window_events": 5000},
                            lineage={"events_seen": 5000})


@pytest.fixture
def keys(settings):
    store = KeyStore.for_settings(settings)
    return {"admin": store.issue(admin=True), "m1": store.issue("m1"), "m2": store.issue("m2")}


@pytest.fixture
def api(settings, keys):
    register(settings, 0.45)
    promote(settings, NAME)
    with TestClient(create_app(settings, poll=False)) as client:
        yield client


def auth(key: str) -> dict:
    return {"X-API-Key": key}


def clicks_json(merchant: str = "m1", n: int = 6) -> list[dict]:
    chosen = [c for c in make_clicks(4 * n, seed=21) if c.merchant_id == merchant][:n]
    return [msgspec.to_builtins(c) for c in chosen]


def test_health_readiness_metrics_and_openapi_docs(api):
    assert api.get("/healthz").json()["status"] == "ok"
    assert api.get("/readyz").json() == {"status": "ready", "model_version": "1", "detail": None}
    spec = api.get("/openapi.json").json()
    assert {"Click", "Order", "CatalogItem"} <= set(spec["components"]["schemas"])
    assert "/v1/merchants/{merchant_id}/recommendations" in spec["paths"]
    assert api.get("/docs").status_code == 200
    metrics = api.get("/metrics").text
    assert 'fedstream_model_version{model="fedstream-ctr"} 1.0' in metrics
    assert 'fedstream_http_requests_total{method="GET",route="/readyz",status="200"} 1.0' in metrics


def test_not_ready_without_a_champion(settings, keys):
    with TestClient(create_app(settings, poll=False)) as client:
        assert client.get("/readyz").status_code == 503
        response = client.get("/v1/merchants/m1/recommendations", params={"user_id": "u1"}, headers=auth(keys["m1"]))
        assert response.status_code == 503 and "champion" in response.json()["detail"]


def test_recommendations_match_the_registered_bundle_and_auth_is_per_merchant(api, keys):
    url = "/v1/merchants/m1/recommendations"
    response = api.get(url, params={"user_id": "u3", "k": 5}, headers=auth(keys["m1"]))
    assert response.status_code == 200
    body = response.json()
    expected = make_bundle().recommend("m1", "u3", k=5)
    assert [i["item_id"] for i in body["items"]] == [item for item, _ in expected]
    assert body["model_version"] == "1" and body["merchant_id"] == "m1"

    assert api.get(url, params={"user_id": "u3"}).status_code == 401
    assert api.get(url, params={"user_id": "u3"}, headers=auth("fsk_nope.nope")).status_code == 401
    assert api.get(url, params={"user_id": "u3"}, headers=auth(keys["m1"] + "x")).status_code == 401
    other = api.get("/v1/merchants/m2/recommendations", params={"user_id": "u3"}, headers=auth(keys["m1"]))
    assert other.status_code == 403 and "m1" in other.json()["detail"]
    assert api.get("/v1/merchants/m2/recommendations", params={"user_id": "u3"},
                   headers=auth(keys["admin"])).status_code == 200
    assert api.get("/v1/merchants/zz/recommendations", params={"user_id": "u"},
                   headers=auth(keys["admin"])).status_code == 404
    for bad in ({"user_id": "u3", "k": 0}, {"user_id": "u3", "k": 101}, {"user_id": "u3", "k": "ten"}, {}):
        rejected = api.get(url, params=bad, headers=auth(keys["m1"]))
        assert rejected.status_code == 422 and rejected.json()["detail"]


def test_predictions_validate_clicks_with_the_stream_schema(api, keys):
    url = "/v1/merchants/m1/predictions"
    clicks = clicks_json()
    response = api.post(url, json={"clicks": clicks}, headers=auth(keys["m1"]))
    assert response.status_code == 200
    expected = make_bundle().predict([msgspec.convert(c, type=type(make_clicks(1)[0])) for c in clicks])
    np.testing.assert_allclose(response.json()["probabilities"], expected, rtol=1e-6)

    def rejected(body, status=422) -> list | str:
        answer = api.post(url, content=body if isinstance(body, bytes) else json.dumps(body), headers=auth(keys["m1"]))
        assert answer.status_code == status, answer.text
        return answer.json()["detail"]

    detail = rejected({"clicks": [clicks[0], dict(clicks[1], position=-1), dict(clicks[2], page="moon")]})
    assert [(d["loc"][-1], d["type"]) for d in detail] == [(1, "out_of_range"), (2, "wrong_type")]
    assert rejected({"clicks": [dict(clicks[0], merchant_id="m2")]})[0]["type"] == "merchant_mismatch"
    order = {"type": "order", "event_id": "e", "order_id": "o", "merchant_id": "m1", "user_id": "u", "timestamp": 1.0,
             "currency": "EUR", "items": [{"item_id": "i", "quantity": 1, "unit_price": 2.0}]}
    assert rejected({"clicks": [order]})[0]["type"] == "unknown_event_type"
    assert rejected({"clicks": [dict(clicks[0], timestamp=time.time() + 10 * 86400)]})[0]["type"] == "future_timestamp"
    assert rejected({"clicks": []})[0]["type"] == "invalid_body"
    assert rejected(b"{not json")[0]["type"] == "invalid_body"
    assert rejected({"clicks": clicks, "extra": 1})[0]["type"] == "invalid_body"
    assert api.post("/v1/merchants/m2/predictions", json={"clicks": clicks}, headers=auth(keys["m1"])).status_code == 403
    metrics = api.get("/metrics").text
    assert 'fedstream_events_rejected_total{reason="out_of_range"} 1.0' in metrics


def test_model_routes_admin_promote_and_rollback(api, settings, keys):
    assert api.get("/v1/models", headers=auth(keys["m1"])).status_code == 403
    mine = api.get("/v1/merchants/m1/model", headers=auth(keys["m1"]))
    assert mine.status_code == 200 and mine.json()["version"] == "1" and mine.json()["merchants"] == 2
    register(settings, 0.40, scale=1.5)
    listed = api.get("/v1/models", headers=auth(keys["admin"])).json()
    assert listed["served"]["version"] == "1"
    assert [(v["version"], v["aliases"]) for v in listed["versions"]] == [("2", ["challenger"]), ("1", ["champion"])]

    assert api.post("/v1/models/promote", json={}, headers=auth(keys["m1"])).status_code == 403
    moved = api.post("/v1/models/promote", json={}, headers=auth(keys["admin"])).json()
    assert moved["moved"] and moved["version"] == "2" and moved["served_version"] == "2"
    assert api.post("/v1/models/promote", json={"version": "abc"}, headers=auth(keys["admin"])).status_code == 422
    assert api.post("/v1/models/promote", json={"version": "99"}, headers=auth(keys["admin"])).status_code == 404
    back = api.post("/v1/models/rollback", headers=auth(keys["admin"])).json()
    assert back["version"] == "1" and back["served_version"] == "1"
    assert api.post("/v1/models/rollback", headers=auth(keys["admin"])).status_code == 409
    assert 'fedstream_model_swaps_total{model="fedstream-ctr"} 3.0' in api.get("/metrics").text


def test_drift_status_is_filtered_per_merchant(api, settings, keys):
    from drift.events import DriftEvent, encode_drift_event
    from drift.monitor import drift_log_path

    path = drift_log_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [encode_drift_event(DriftEvent(merchant_id=m, detector="label.ctr", statistic="z", value=7.0,
                                           threshold=6.0, window_start_index=0, window_end_index=10,
                                           window_start_time=1.0, window_end_time=2.0, event_index=10))
             for m in ("m1", "m2", "m1")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    mine = api.get("/v1/merchants/m1/drift", headers=auth(keys["m1"])).json()
    assert mine["count"] == 2 and {e["merchant_id"] for e in mine["events"]} == {"m1"}
    assert api.get("/v1/merchants/m2/drift", headers=auth(keys["m1"])).status_code == 403
    assert api.get("/v1/drift", headers=auth(keys["m1"])).status_code == 403
    assert api.get("/v1/drift", headers=auth(keys["admin"])).json()["count"] == 3
    assert api.get("/v1/drift", params={"limit": 0}, headers=auth(keys["admin"])).status_code == 422


def test_events_are_produced_to_kafka_keyed_by_merchant(kafka_settings, keys):
    from streams.schemas import decode_event
    from tests.test_streams_pipeline import drain_raw

    settings = kafka_settings
    with TestClient(create_app(settings, poll=False)) as api:
        catalog = {"type": "catalog", "event_id": "c1", "merchant_id": "m1", "item_id": "new", "category": "hats",
                   "price": 9.5, "title": "hat", "timestamp": 1.7e9}
        events = clicks_json(n=3) + [catalog]
        response = api.post("/v1/events", json={"events": events}, headers=auth(keys["m1"]))
        assert response.status_code == 202, response.text
        assert response.json() == {"accepted": 4, "by_type": {"click": 3, "catalog": 1}, "dead_lettered": 0,
                                   "reasons": {}, "rejected": []}
        foreign = api.post("/v1/events", json={"events": clicks_json("m2", 1)}, headers=auth(keys["m1"]))
        assert foreign.status_code == 403 and foreign.json()["detail"][0]["type"] == "merchant_mismatch"
        bad_click = dict(events[0], event_id="bad-1", clicked="yes")
        mixed = api.post("/v1/events", json={"events": [bad_click, {"type": "refund", "event_id": "bad-2"}]},
                         headers=auth(keys["admin"]))
        assert mixed.status_code == 202, mixed.text
        answer = mixed.json()
        assert answer["accepted"] == 0 and answer["dead_lettered"] == 2
        assert [r["index"] for r in answer["rejected"]] == [0, 1]
        assert answer["reasons"] == {"wrong_type": 1, "unknown_event_type": 1}
        assert api.post("/v1/events", json={"events": events}).status_code == 401

    records = drain_raw(settings, settings.topics.clicks.name, 3)
    assert sorted(decode_event(r.value).event_id for r in records) == sorted(e["event_id"] for e in events[:3])
    assert {r.key for r in records} == {b"m1"}
    dead = drain_raw(settings, settings.topics.dead_letter.name, 2)
    assert sorted(dict(r.headers)["reason"].decode() for r in dead) == ["unknown_event_type", "wrong_type"]
    admin_id, _, admin_secret = keys["admin"][len("fsk_"):].partition(".")
    assert {dict(r.headers)["api_key_id"].decode() for r in dead} == {admin_id}  # which key sent them
    assert not any(admin_secret.encode() in value for r in dead for _, value in r.headers)  # never the secret
    assert b'"bad-1"' in dead[0].value or b'"bad-1"' in dead[1].value


def test_events_without_a_broker_are_refused_with_503(api, keys):
    response = api.post("/v1/events", json={"events": clicks_json(n=1)}, headers=auth(keys["m1"]))
    assert response.status_code == 503 and "broker" in response.json()["detail"]


def test_hot_swap_under_load_has_no_failed_requests(settings, keys):
    settings = settings.model_copy(update={"serving": settings.serving.model_copy(update={"swap_poll_seconds": 0.1})})
    register(settings, 0.45)
    promote(settings, NAME)
    failures, versions, stop = [], set(), threading.Event()
    with TestClient(create_app(settings, poll=True)) as api:
        def hammer(user: str) -> None:
            while not stop.is_set():
                answer = api.get("/v1/merchants/m1/recommendations", params={"user_id": user, "k": 10},
                                 headers=auth(keys["m1"]))
                if answer.status_code != 200 or len(answer.json()["items"]) != 10:
                    failures.append(answer.status_code)
                else:
                    versions.add(answer.json()["model_version"])

        workers = [threading.Thread(target=hammer, args=(f"u{i}",)) for i in range(3)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.3)
            register(settings, 0.40, scale=2.0)
            assert promote(settings, NAME).moved
            deadline = time.monotonic() + 20
            while "2" not in versions and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert failures == [] and versions == {"1", "2"}
        assert api.get("/readyz").json()["model_version"] == "2"


def test_keys_are_stored_hashed_revocable_and_issued_by_the_cli(settings, api, keys):
    stored = keys_path(settings).read_text()
    assert all(token.split(".", 1)[1] not in stored for token in keys.values())
    assert oct(keys_path(settings).stat().st_mode & 0o777) == "0o600"
    store = KeyStore.for_settings(settings)
    assert store.revoke(keys["m2"][4:].split(".")[0]) and not store.revoke("unknown")
    with pytest.raises(ValueError):
        store.issue("m1", admin=True)

    from fedstream.cli import main

    env = {"FEDSTREAM_DATA_DIR": str(settings.data_dir)}
    runner = CliRunner()
    issued = runner.invoke(main, ["serve", "keys", "issue", "--merchant", "m2", "--json"], env=env)
    assert issued.exit_code == 0, issued.output
    token = json.loads(issued.output)["token"]
    assert runner.invoke(main, ["serve", "keys", "issue"], env=env).exit_code == 2
    listed = json.loads(runner.invoke(main, ["serve", "keys", "list", "--json"], env=env).output)
    assert sum(row["revoked"] for row in listed) == 1 and len(listed) == 4
    assert runner.invoke(main, ["serve", "--help"], env=env).exit_code == 0
    time.sleep(1.1)  # the API re-reads the key file at most once a second
    url = "/v1/merchants/m2/recommendations"
    assert api.get(url, params={"user_id": "u1"}, headers=auth(token)).status_code == 200
    assert api.get(url, params={"user_id": "u1"}, headers=auth(keys["m2"])).status_code == 401


def test_catalog_growth_per_merchant_is_bounded_from_the_served_models_catalog(settings, keys):
    register(settings, 0.45)
    promote(settings, NAME)
    bounded = settings.model_copy(update={"serving": settings.serving.model_copy(
        update={"max_catalog_items": 201, "max_categories": 6})})  # m1 is served with 200 items in 5 categories

    def item(item_id: str, category: str = "hats") -> dict:
        return {"type": "catalog", "event_id": f"c-{item_id}", "merchant_id": "m1", "item_id": item_id,
                "category": category, "price": 9.5, "title": "t", "timestamp": 1.7e9}

    with TestClient(create_app(bounded, poll=False)) as api:
        def post(*events):
            return api.post("/v1/events", json={"events": list(events)}, headers=auth(keys["m1"]))

        too_many = post(item("new-1"), item("new-2"))
        assert too_many.status_code == 422 and too_many.json()["detail"][0]["type"] == "catalog_limit"
        assert post(item("m1-i3"), item("m1-i4", "shoes")).status_code == 503  # known items: admitted (no broker)
        assert post(item("new-1")).status_code == 503  # the 201st item: admitted
        assert post(item("new-1")).status_code == 503  # the same item again (a retry) still fits
        assert post(item("new-2")).json()["detail"][0]["msg"] == "merchant 'm1' would have over 201 catalog items"
        assert post(item("m1-i5", "scarves"), item("m1-i6", "gloves")).json()["detail"][0]["type"] == "catalog_limit"


def test_a_deeply_nested_event_in_a_batch_is_dead_lettered_alone(kafka_settings, keys):
    """msgspec's skip of a raw list item recurses: a 2 KB event nested 5,000 deep answered 500."""
    from tests.test_streams_pipeline import drain_raw

    settings = kafka_settings
    good = clicks_json(n=2)
    deep = "[" * 5000 + "]" * 5000
    body = ('{"events": [' + json.dumps(good[0]) + ", " + deep + ", " + json.dumps(good[1]) + "]}").encode()
    with TestClient(create_app(settings, poll=False)) as api:
        response = api.post("/v1/events", content=body, headers={**auth(keys["m1"]), "content-type": "application/json"})
        assert response.status_code == 202, response.text
        answer = response.json()
        assert answer["accepted"] == 2 and answer["dead_lettered"] == 1 and answer["reasons"] == {"too_deep": 1}
        assert [r["index"] for r in answer["rejected"]] == [1]
        smuggled = b'{"events": [' + json.dumps(good[0]).encode() + b'], "x": ' + deep.encode() + b"}"
        refused = api.post("/v1/events", content=smuggled, headers={**auth(keys["m1"]), "content-type": "application/json"})
        assert refused.status_code == 422 and refused.json()["detail"][0]["type"] == "invalid_body"
    assert len(drain_raw(settings, settings.topics.clicks.name, 2)) == 2
    dead = drain_raw(settings, settings.topics.dead_letter.name, 1)
    assert dict(dead[0].headers)["reason"] == b"too_deep"
