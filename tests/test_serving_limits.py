"""Hostile input at the HTTP boundary: bodies bounded while streaming, auth before any body is read,
per-key rate limits, bounded catalogs, no internals echoed in 503s, dead letters naming the sending key."""

from __future__ import annotations

import asyncio
import socket

import pytest
from fastapi.testclient import TestClient

from fedstream.settings import Settings
from serving.app import create_app
from serving.keys import KeyStore

CHUNK = 16 * 1024


def with_serving(settings: Settings, **changes) -> Settings:
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=changes)})


def key_id(token: str) -> str:
    return token[len("fsk_"):].partition(".")[0]


def call(app, method: str, path: str, headers: dict[str, str], chunks: int, declared: int | None = None):
    """One request straight through ASGI with a body of ``chunks`` chunks (chunked: no Content-Length unless
    ``declared``); returns (status, headers, chunks the app pulled)."""
    pulled, messages = 0, []

    async def receive():
        nonlocal pulled
        if pulled < chunks:
            pulled += 1
            return {"type": "http.request", "body": b"{" * CHUNK, "more_body": pulled < chunks}
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)

    raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()] + [(b"content-type", b"application/json")]
    raw_headers.append((b"content-length", str(declared).encode()) if declared is not None
                       else (b"transfer-encoding", b"chunked"))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": raw_headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    return start["status"], dict(start["headers"]), pulled


@pytest.fixture
def tokens(settings: Settings) -> dict[str, str]:
    store = KeyStore.for_settings(settings)
    return {"admin": store.issue(admin=True), "m1": store.issue("m1")}


def test_a_chunked_body_over_the_limit_is_refused_without_being_read_whole(settings, tokens):
    app = create_app(with_serving(settings, max_body_bytes=4 * CHUNK), poll=False)
    status, _, pulled = call(app, "POST", "/v1/events", {"X-API-Key": tokens["admin"]}, chunks=64)
    assert status == 413 and pulled == 5  # the first chunk past 64 KiB ends the read; 1 MiB was on offer
    status, _, pulled = call(app, "POST", "/v1/events", {"X-API-Key": tokens["admin"]}, chunks=64, declared=64 * CHUNK)
    assert status == 413 and pulled == 0  # a declared length over the limit is refused before reading
    status, _, pulled = call(app, "POST", "/v1/merchants/m1/predictions", {"X-API-Key": tokens["m1"]}, chunks=64)
    assert status in (413, 503) and pulled <= 5


def test_unauthenticated_or_merchant_promote_is_refused_before_its_body_is_read(settings, tokens):
    app = create_app(settings, poll=False)
    assert call(app, "POST", "/v1/models/promote", {}, chunks=400)[::2] == (401, 0)  # 6.5 MB of bad JSON, unread
    assert call(app, "POST", "/v1/models/promote", {"X-API-Key": "fsk_nope.nope"}, chunks=400)[::2] == (401, 0)
    assert call(app, "POST", "/v1/models/promote", {"X-API-Key": tokens["m1"]}, chunks=400)[::2] == (403, 0)
    assert call(app, "POST", "/v1/events", {}, chunks=400)[::2] == (401, 0)
    assert call(app, "POST", "/v1/models/promote", {"X-API-Key": tokens["admin"]}, chunks=1)[0] == 422


def test_each_key_is_rate_limited_with_retry_after(settings, tokens):
    limited = with_serving(settings, rate_limit_per_second=0.5, rate_limit_burst=3)
    with TestClient(create_app(limited, poll=False)) as api:
        url = "/v1/merchants/m1/model"
        statuses = [api.get(url, headers={"X-API-Key": tokens["m1"]}).status_code for _ in range(4)]
        assert statuses == [503, 503, 503, 429]  # no champion yet: 503 after auth, until the bucket is empty
        refused = api.get(url, headers={"X-API-Key": tokens["m1"]})
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "2"
        assert api.get(url, headers={"X-API-Key": tokens["admin"]}).status_code == 503  # other keys unaffected
        assert api.get(url).status_code == 401
        assert 'route="/v1/merchants/{merchant_id}/model",status="429"} 2.0' in api.get("/metrics").text


def test_readiness_and_503s_do_not_echo_internal_errors_or_broker_addresses(settings, tokens, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    broken = settings.model_copy(update={
        "mlflow_tracking_uri": f"sqlite:///{tmp_path}/no/such/dir/mlflow.db",
        "bootstrap_servers": f"127.0.0.1:{closed_port}",
        "kafka": settings.kafka.model_copy(update={"bootstrap_timeout_ms": 500, "request_timeout_ms": 1000}),
    })
    with TestClient(create_app(broken, poll=False)) as api:
        assert api.app.state.holder.last_error and str(tmp_path) in api.app.state.holder.last_error
        ready = api.get("/readyz")
        assert ready.status_code == 503 and str(tmp_path) not in ready.text and "last load failed" in ready.text
        click = {"type": "click", "event_id": "e1", "merchant_id": "m1", "user_id": "u1", "item_id": "i1",
                 "session_id": "s1", "timestamp": 1.7e9, "position": 0, "page": "home", "device": "mobile",
                 "clicked": True}
        sent = api.post("/v1/events", json={"events": [click]}, headers={"X-API-Key": tokens["m1"]})
        assert sent.status_code == 503 and str(closed_port) not in sent.text and "127.0.0.1" not in sent.text
        listed = api.get("/v1/models", headers={"X-API-Key": tokens["admin"]})
        assert listed.status_code == 503 and str(tmp_path) not in listed.text


def test_ranking_runs_off_the_event_loop(settings, tokens):
    """While one request ranks (CPU-bound: it holds its thread), the event loop keeps answering others."""
    import threading
    import time

    import httpx

    from registry.bundle import ModelBundle
    from serving.holder import ServedModel
    from tests.test_registry_bundle import make_bundle

    started, answered = threading.Event(), threading.Event()

    class SlowRanking(ModelBundle):
        def recommend_items(self, *args, **kwargs):  # what the recommendations route calls
            self.ranked_on = threading.get_ident()
            started.set()
            self.saw_answer = answered.wait(timeout=3.0)  # holds its thread, as a huge catalog's ranking would
            return super().recommend_items(*args, **kwargs)

    plain = make_bundle()
    bundle = SlowRanking(model=plain.model, feature_bits=plain.feature_bits, context=plain.context)
    app = create_app(settings, poll=False)
    app.state.holder.current = ServedModel("fedstream-ctr", "1", bundle, time.time())

    async def race() -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            async def health_while_ranking():
                deadline = time.monotonic() + 30
                while not started.is_set():
                    assert time.monotonic() < deadline, "the ranking never started"
                    await asyncio.sleep(0.005)
                response = await client.get("/healthz")
                answered.set()
                return response

            ranked, health = await asyncio.gather(
                client.get("/v1/merchants/m1/recommendations", params={"user_id": "u1"},
                           headers={"X-API-Key": tokens["m1"]}),
                health_while_ranking())
            assert ranked.status_code == 200 and health.status_code == 200
            return threading.get_ident()

    loop_thread = asyncio.run(race())
    assert bundle.saw_answer and bundle.ranked_on != loop_thread
