"""Fetched bytes read 256 KiB per ``recv`` (:class:`streams.fetch_ahead.LargeReadTransport`, installed by every
``EventConsumer``): exactly what kafka-python's own transport reads, on a socket pair (data then nothing more,
data then the peer gone, bytes larger than one read) and on the real broker."""

from __future__ import annotations

import random
import select
import socket
import threading

import pytest
from kafka.net.transport import KafkaTCPTransport

from streams.consumer import EventConsumer
from streams.fetch_ahead import READ_SIZE, LargeReadTransport, install_large_reads
from streams.kafka import make_producer
from streams.schemas import encode_event
from tests.test_streams_pipeline import NOW, group, valid_events


def _read_all(transport_class, payload: bytes, close: bool) -> tuple[bytes, str | None]:
    """Everything ``_sock_recv`` calls of ``transport_class`` return, called as kafka-python's read loop does
    (once the socket is readable), while a peer writes ``payload`` (then, with ``close``, goes away): the
    bytes, and the error as text."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)

    def write() -> None:
        theirs.sendall(payload)
        if close:
            theirs.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write)
    writer.start()
    transport, got, error = transport_class(None, ours), b"", None
    try:
        while error is None and (len(got) < len(payload) or close):
            assert select.select([ours], [], [], 5)[0]
            data, error = transport._sock_recv()
            got += data
        writer.join()
        return got, None if error is None else str(error)
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("size, close", [(10, False), (10, True), (3 * READ_SIZE + 17, False), (4096 * 5 + 1, True)])
def test_large_reads_return_kafka_pythons_bytes_and_errors(size, close):
    payload = random.Random(size).randbytes(size)
    ours = _read_all(LargeReadTransport, payload, close)
    assert ours == _read_all(KafkaTCPTransport, payload, close)
    assert ours[0] == payload and (ours[1] is not None) == close


def test_a_consumers_broker_connections_read_large_and_bring_every_record(kafka_settings):
    values = [encode_event(event) for event in valid_events(2000, seed=5)]
    producer = make_producer(kafka_settings)
    for value in values:
        producer.send(kafka_settings.topics.clicks.name, value=value, key=b"k", partition=0)
    producer.flush()
    producer.close()
    consumer = EventConsumer(kafka_settings, group(), [kafka_settings.topics.clicks.name], now=NOW,
                             handle_signals=False)
    got = []
    try:
        while len(got) < len(values):
            batch = consumer.poll(timeout_ms=2000)
            got += [(record.offset, encode_event(record.event)) for record in batch]
        transports = [conn.transport for conn in consumer.kafka._manager._conns.values() if conn.transport]
        assert transports and all(type(transport) is LargeReadTransport for transport in transports)
    finally:
        consumer.close()
    assert got == list(enumerate(values))


def test_only_a_manager_that_builds_transports_is_changed():
    class Elsewhere:
        _manager = object()

    assert not install_large_reads(Elsewhere())
