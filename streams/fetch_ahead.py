"""Fetching ahead: kafka-python's fetcher, sending the next fetch while a partition's records are still handed
out (:class:`AheadFetcher`, installed by :func:`install_fetch_ahead`; design and figures: streams/README.md,
"Fetching ahead"); and the fetched bytes read from the socket in large pieces (:class:`LargeReadTransport`,
:func:`install_large_reads`)."""

from __future__ import annotations

import logging

import kafka.errors as Errors
from kafka.consumer.fetcher import CompletedFetch, Fetcher
from kafka.net.transport import KafkaTCPTransport

#: kafka-python's fetcher has the methods :class:`AheadFetcher` refines or relies on (see :func:`install_fetch_ahead`)
SUPPORTED_AHEAD = (
    all(hasattr(Fetcher, name) for name in ("_fetchable_partitions", "fetched_records", "fetch_records"))
    and "partition_data" in CompletedFetch._fields
)


#: the fetcher's state :class:`AheadFetcher` reads (instance attributes, checked per fetcher)
_AHEAD_STATE = ("_completed_fetches", "_next_partition_records", "_paused_completed_fetches",
                "_paused_partition_records", "_subscriptions")


def _brought_nothing(completion) -> bool:
    """A completed fetch without records, error or diverging epoch: handing it out changes no position
    (kafka-python only drains it), so its partition can be fetched again while it waits in the queue."""
    data = completion.partition_data
    diverging = getattr(data, "diverging_epoch", None)
    return data.error_code == 0 and not data.records and (diverging is None or diverging.end_offset < 0)


class AheadFetcher(Fetcher):
    """kafka-python's fetcher, fetching the next records while a partition's are still handed out.

    kafka-python sends the next fetch only once no completed fetch is queued, and never for a partition
    that has one queued. A response brings every requested partition, most of them empty on a backlog
    (the broker fills a response with one or two partitions' records), and the empty ones wait in the
    queue behind the partition being handed out: the next fetch left only when that partition was done,
    and the poll after it waited for the whole round trip. Here completions that brought nothing neither
    hold the fetch back nor keep their partition out of it, when the fetch would come back with records
    at once: a partition it asks for is behind its high watermark (a fetch of caught-up partitions only
    would wait ``fetch_max_wait_ms`` at the broker, holding back the next one). Records, offsets and their
    order are kafka-python's: a refetched partition is fetched at the position its empty completion leaves
    unchanged, and the completions are handed out in the order they came."""

    def fetched_records(self, max_records=None, update_offsets=True):
        records, partial = super().fetched_records(max_records, update_offsets)
        return records, partial and not self._ahead_brings_records()

    def _ahead_brings_records(self) -> bool:
        """Only completions that brought nothing are queued, and a partition a fetch would ask for now is
        behind its high watermark (:meth:`_behind`)."""
        queued = self._completed_fetches.copy()
        return all(map(_brought_nothing, queued)) and self._behind(self._fetchable_partitions(), queued)

    def _behind(self, partitions: list, queued: list) -> bool:
        """Whether one of ``partitions`` is behind its high watermark: the one its queued completion carries
        (a response full before it came to the partition) or the last one handed out."""
        behind = {fetch.topic_partition for fetch in queued
                  if fetch.fetched_offset < fetch.partition_data.high_watermark}
        assignment = self._subscriptions.assignment
        for tp in partitions:
            state = assignment.get(tp)
            position = state.position if state is not None else None
            if tp in behind or (position is not None and state.highwater is not None
                                and position.offset < state.highwater):
                return True
        return False

    def _fetchable_partitions(self):
        """kafka-python's, less the partitions whose records wait to be handed out; none at all while some
        do and no other is behind. The IO thread may queue a completion with records between the poll's
        check and this call: a fetch of caught-up partitions only would then long-poll
        ``fetch_max_wait_ms`` at the broker and hold back the next one."""
        queued = self._completed_fetches.copy()
        handing_out = {fetch.topic_partition for fetch in queued if not _brought_nothing(fetch)}
        current = self._next_partition_records
        if current:
            handing_out.add(current.topic_partition)
        waiting = handing_out | set(self._paused_completed_fetches) | set(self._paused_partition_records)
        fetchable = [tp for tp in self._subscriptions.fetchable_partitions() if tp not in waiting]
        if handing_out and not self._behind(fetchable, queued):
            return []
        return fetchable


def install_fetch_ahead(kafka_consumer) -> bool:
    """Make one kafka-python consumer fetch ahead (:class:`AheadFetcher`). Returns False (and changes
    nothing) when its fetcher is not kafka-python's own or lacks the expected internals."""
    fetcher = getattr(kafka_consumer, "_fetcher", None)
    if not SUPPORTED_AHEAD or type(fetcher) is not Fetcher or not all(hasattr(fetcher, name) for name in _AHEAD_STATE):
        return False
    fetcher.__class__ = AheadFetcher
    return True


#: bytes asked of the socket per ``recv`` call by :class:`LargeReadTransport` (kafka-python asks 4 KiB)
READ_SIZE = 256 * 1024

#: kafka-python's TCP transport drains its socket in ``_sock_recv``, built by its connection manager's
#: ``_build_transport`` (see :func:`install_large_reads`)
SUPPORTED_READS = all(hasattr(KafkaTCPTransport, name) for name in ("_sock_recv", "_read_from_sock"))

_transport_log = logging.getLogger("kafka.net.transport")  # kafka-python's own logger, for its messages


class LargeReadTransport(KafkaTCPTransport):
    """kafka-python's TCP transport, draining its socket :data:`READ_SIZE` bytes per ``recv`` instead of 4 KiB.

    A consumer's fetch responses are megabytes (the full backlog is 52 MB): kafka-python read them in
    ~13,000 calls, each a Python iteration, a system call and a ``bytes`` object. The same bytes, in the same
    order, with the same end-of-stream and error handling (kafka-python's ``_sock_recv`` but for the size)."""

    def _sock_recv(self):
        received, error = [], None
        while True:
            try:
                data = self._sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except BaseException as exc:
                _transport_log.exception("%s: Error receiving network data closing socket", self)
                error = Errors.KafkaConnectionError(exc)
                break
            if not data:  # the peer closed the connection
                _transport_log.error("%s: socket disconnected", self)
                error = Errors.KafkaConnectionError("socket disconnected")
                break
            received.append(data)
        return b"".join(received), error


def install_large_reads(kafka_consumer) -> bool:
    """Make the broker connections one kafka-python consumer opens from now on read their socket with
    :class:`LargeReadTransport` (TLS connections keep kafka-python's transport). Returns False (and changes
    nothing) when its connection manager lacks the expected internals."""
    manager = getattr(kafka_consumer, "_manager", None)
    build = getattr(manager, "_build_transport", None)
    if not SUPPORTED_READS or build is None:
        return False

    async def build_reading_large(node, timeout_at=None):
        transport = await build(node, timeout_at=timeout_at)
        if type(transport) is KafkaTCPTransport:
            transport.__class__ = LargeReadTransport
        return transport

    manager._build_transport = build_reading_large
    return True


__all__ = ["AheadFetcher", "LargeReadTransport", "READ_SIZE", "SUPPORTED_AHEAD", "SUPPORTED_READS",
           "install_fetch_ahead", "install_large_reads"]
