"""Property-based API test: schemathesis generates requests from our OpenAPI spec; no request may get a 5xx.

The app serves a real registered model and produces to the session's real broker (so valid generated
events are accepted with 202 rather than refused for lack of a broker). Requests carry an admin key so
generation reaches every route's validation and business logic, not just the 401 check.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings

from registry.models import promote, register_version
from serving.app import create_app
from serving.keys import KeyStore
from tests.conftest import unique_topics
from tests.test_registry_bundle import make_bundle

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, broker: str):
    from fedstream.settings import load_settings
    from streams.kafka import ensure_topics

    settings = load_settings(data_dir=tmp_path_factory.mktemp("schemathesis") / "data", feature_bits=16,
                             bootstrap_servers=broker, topics=unique_topics("st"))
    ensure_topics(settings)
    register_version(settings, make_bundle(), name=settings.serving.model_name,
                     metrics={"prequential_logloss": 0.45, "window_events": 5000}, lineage={"events_seen": 5000})
    promote(settings, settings.serving.model_name)
    admin = KeyStore.for_settings(settings).issue(admin=True)
    app = create_app(settings, poll=False, drift_source="file")
    app.state.holder.refresh()  # the ASGI transport does not run the lifespan
    yield app, admin
    app.state.holder.stop()


@pytest.fixture(scope="module")
def api_schema(served):
    app, _ = served
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def admin_key(served) -> str:
    return served[1]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case, admin_key):
    response = case.call(headers={"X-API-Key": admin_key})
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}"
