"""The recommendations fast path answers valid requests as the FastAPI route would, keeps every check, and
a served version's rankings move onto the event loop only while they are measured cheap."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from fedstream.settings import Settings
from serving import deps
from serving.app import create_app
from serving.holder import INLINE_STREAK, RankingPlacement, ServedModel
from serving.keys import KeyStore
from tests.test_registry_bundle import make_bundle


def with_serving(settings: Settings, **changes) -> Settings:
    return settings.model_copy(update={"serving": settings.serving.model_copy(update=changes)})


def serving(settings: Settings, bundle=None, **changes):
    """An app serving ``bundle`` as version 7, placed as the holder places a loaded version."""
    configured = with_serving(settings, **changes)
    app = create_app(configured, poll=False)
    placement = RankingPlacement(configured.serving.inline_ranking_ms / 1000)
    app.state.holder.current = ServedModel("fedstream-ctr", "7", bundle or make_bundle(), time.time(), placement)
    return app


@pytest.fixture
def tokens(settings: Settings) -> dict[str, str]:
    store = KeyStore.for_settings(settings)
    return {"admin": store.issue(admin=True), "m1": store.issue("m1")}


def test_valid_requests_are_answered_without_the_routes_dependencies_and_as_the_route_would(settings, tokens):
    app = serving(settings)

    def unreachable():
        raise AssertionError("a valid request reached FastAPI's dependency solving")

    bundle = app.state.holder.current.bundle
    url = "/v1/merchants/m1/recommendations"
    with contextlib.closing(TestClient(app)) as client:
        app.dependency_overrides[deps.served] = unreachable
        for params in ({"user_id": "u3"}, {"user_id": "ü 3+x", "k": "5"}, {"user_id": "u3", "k": 7, "item_id": "i1"}):
            answer = client.get(url, params=params, headers={"X-API-Key": tokens["m1"]})
            assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
            k = int(params.get("k", 10))
            expected = bundle.recommend_items("m1", params["user_id"], k, item_id=params.get("item_id"))
            assert answer.json() == {"merchant_id": "m1", "user_id": params["user_id"], "model_version": "7",
                                     "ranked_by": bundle.ranked_by(), "items": [{"item_id": r.item_id, "score": r.score, "source": r.source}
                                               for r in expected]}
        app.dependency_overrides.clear()
        metrics = client.get("/metrics").text
    assert 'route="/v1/merchants/{merchant_id}/recommendations",status="200"} 3.0' in metrics


def test_requests_failing_a_check_get_the_routes_answers(settings, tokens):
    app = serving(settings)
    url = "/v1/merchants/m1/recommendations"
    with contextlib.closing(TestClient(app)) as client:  # no lifespan: the served model is set above
        def get(params, key=tokens["m1"], path=url):
            return client.get(path, params=params, headers={"X-API-Key": key} if key else {})

        assert get({"user_id": "u1"}, key=None).status_code == 401
        assert get({"user_id": "u1"}, key=tokens["m1"] + "x").status_code == 401
        assert get({"user_id": "u1"}, path="/v1/merchants/m2/recommendations").status_code == 403
        for bad in ({"user_id": ""}, {"user_id": "u" * 129}, {"user_id": "u", "k": "0"}, {"user_id": "u", "k": "101"},
                    {"user_id": "u", "k": "²"}, {"user_id": "u", "item_id": ""}):
            assert get(bad).status_code == 422, bad
        assert get({"user_id": "u1"}, key=tokens["admin"], path="/v1/merchants/zz/recommendations").status_code == 404
        app.state.holder.current = None
        assert get({"user_id": "u1"}, key=tokens["admin"]).status_code == 503


def test_the_fast_path_spends_the_keys_rate_limit(settings, tokens):
    app = serving(settings, rate_limit_per_second=0.01, rate_limit_burst=3)
    with contextlib.closing(TestClient(app)) as client:
        answers = [client.get("/v1/merchants/m1/recommendations", params={"user_id": "u1"},
                              headers={"X-API-Key": tokens["m1"]}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429] and answers[-1].headers["Retry-After"]


def test_placement_moves_onto_the_loop_after_a_cheap_streak_and_back_after_one_over_budget():
    placement = RankingPlacement(budget_s=0.002, streak=3)
    seen = []
    for cpu in (0.001, 0.001, 0.001, 0.001, 0.005, 0.001, 0.001, 0.001):
        seen.append(placement.inline)
        placement.record(cpu)
    assert seen == [False, False, False, True, True, False, False, False] and placement.inline
    never = RankingPlacement(budget_s=0.0, streak=1)
    never.record(0.0)
    assert not never.inline


def test_a_cheap_versions_rankings_run_on_the_event_loop_after_the_streak(settings, tokens):
    threads: list[int] = []

    class Recorded(type(make_bundle())):
        def recommend_items(self, *args, **kwargs):
            threads.append(threading.get_ident())
            return super().recommend_items(*args, **kwargs)

    plain = make_bundle()

    def app_with(budget_ms: float):
        bundle = Recorded(model=plain.model, feature_bits=plain.feature_bits, context=plain.context)
        return serving(settings, bundle, inline_ranking_ms=budget_ms)

    async def loop_thread_and_rankings(app) -> int:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            for n in range(INLINE_STREAK + 5):
                answer = await client.get("/v1/merchants/m1/recommendations", params={"user_id": f"u{n}"},
                                          headers={"X-API-Key": tokens["m1"]})
                assert answer.status_code == 200
        return threading.get_ident()

    loop = asyncio.run(loop_thread_and_rankings(app_with(1000.0)))  # every ranking is under a second of CPU
    assert loop not in threads[:INLINE_STREAK] and set(threads[INLINE_STREAK:]) == {loop}
    threads.clear()
    loop = asyncio.run(loop_thread_and_rankings(app_with(0.0)))  # 0: always in the threadpool
    assert loop not in threads and len(threads) == INLINE_STREAK + 5
