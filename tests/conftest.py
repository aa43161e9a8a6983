"""Shared fixtures: one embedded broker per test session, fresh settings and MLflow store per test.

Hermetic: loopback only, free ports, temp dirs; each test gets its own topic names so tests never
see each other's messages on the shared broker.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedstream.settings import Settings, Topic, Topics, load_settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
for _var in [v for v in os.environ if v.startswith("FEDSTREAM_")]:
    os.environ.pop(_var)  # a developer's shell must not leak into the tests


@pytest.fixture(scope="session", autouse=True)
def _stop_tff_workers_at_exit() -> Iterator[None]:
    """Safety net: TFF's worker_binary children must not outlive the test session (CI would hang)."""
    yield
    from fedstream.processes import stop_tff_workers

    stop_tff_workers()


@pytest.fixture(scope="module")
def tff_module():
    """TFF on its sync local C++ context for one test module; its worker_binary stopped after the module
    (it outlives Python and holds the test runner's pipes)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow_federated as tff

    from fedstream.processes import stop_tff_workers

    tff.backends.native.set_sync_local_cpp_execution_context()
    yield tff
    stop_tff_workers()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of an embedded tansu broker that lives for the whole test session."""
    from fedstream.processes import terminate
    from streams.broker import start_broker_process

    proc, record = start_broker_process(tmp_path_factory.mktemp("broker"))
    try:
        yield record.bootstrap
    finally:
        terminate(proc.pid)


def unique_topics(prefix: str = "t") -> Topics:
    """Topic names no other test uses (the broker is shared by the session)."""
    tag = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return Topics(
        clicks=Topic(name=f"{tag}.clicks", partitions=4),
        orders=Topic(name=f"{tag}.orders", partitions=4),
        catalog=Topic(name=f"{tag}.catalog", partitions=2),
        dead_letter=Topic(name=f"{tag}.dead-letter", partitions=1),
        drift=Topic(name=f"{tag}.drift", partitions=1),
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings with a private data dir (and so a private sqlite MLflow store); no broker."""
    return load_settings(data_dir=tmp_path / "data", feature_bits=16)


@pytest.fixture
def kafka_settings(settings: Settings, broker: str) -> Settings:
    """Settings pointing at the session broker, with this test's own topics already created."""
    from streams.kafka import ensure_topics

    configured = settings.model_copy(update={"bootstrap_servers": broker, "topics": unique_topics()})
    ensure_topics(configured)
    return configured
