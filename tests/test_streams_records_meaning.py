"""The fast record paths check, before first use, that kafka-python's privates still mean what they meant."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from kafka.consumer.fetcher import Fetcher
from kafka.record.memory_records import MemoryRecordsBuilder

from streams import records


@pytest.fixture(autouse=True)
def _fresh_check():
    records.fast_paths_agree.cache_clear()
    yield
    records.fast_paths_agree.cache_clear()


def test_pinned_kafka_python_agrees_with_the_fast_paths() -> None:
    assert records.fast_paths_agree()


def test_a_changed_meaning_disables_the_fast_consumer_loudly(monkeypatch, caplog) -> None:
    take = Fetcher.PartitionRecords.take
    monkeypatch.setattr(Fetcher.PartitionRecords, "take", lambda self, n=None: take(self, n)[:-1])
    with caplog.at_level(logging.ERROR, logger="fedstream.streams.records"):
        assert not records.fast_paths_agree()
    assert "consuming" in caplog.records[-1].problem
    consumer = SimpleNamespace(_fetcher=SimpleNamespace(PartitionRecords=Fetcher.PartitionRecords))
    assert records.install_fast_fetch(consumer) is False
    assert consumer._fetcher.PartitionRecords is Fetcher.PartitionRecords


def test_a_changed_builder_disables_bulk_producing(monkeypatch) -> None:
    append = MemoryRecordsBuilder.append
    monkeypatch.setattr(MemoryRecordsBuilder, "append",
                        lambda self, timestamp, key, value, headers: append(self, timestamp + 1, key, value, headers))
    assert not records.fast_paths_agree()
