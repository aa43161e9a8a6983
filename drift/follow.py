"""Feature and label drift detectors as a long-running consumer-group member (``fedstream drift monitor --follow``).

Design notes: `drift/README.md`, `drift/follow.py`.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drift.monitor import DriftMonitor, DriftSink
from fedstream.files import read_versioned, write_atomic
from fedstream.logs import get_logger
from fedstream.settings import Settings

log = get_logger("drift.follow")

CHECKPOINT_VERSION = 1


class DriftFollower:
    """Consume clicks, orders and catalog as group ``group`` and feed every event to a :class:`DriftMonitor`.

    ``run()`` returns a summary when stopped by SIGTERM/SIGINT, after ``max_events``, or after
    ``idle_timeout_s`` seconds without records.
    """

    def __init__(self, settings: Settings, *, group: str = "fedstream-drift", checkpoint_path: Path | None = None,
                 sinks: Sequence[DriftSink] = (), checkpoint_seconds: float = 10.0,
                 idle_timeout_s: float | None = None, max_events: int | None = None) -> None:
        self.settings = settings
        self.group = group
        self.checkpoint_path = checkpoint_path or settings.data_path / "drift" / f"{group}.ckpt"
        self.checkpoint_seconds = checkpoint_seconds
        self.idle_timeout_s = idle_timeout_s
        self.max_events = max_events
        self.offsets: dict[tuple[str, int], int] = {}
        saved = read_versioned(self.checkpoint_path, CHECKPOINT_VERSION, "drift follower")
        if saved is None:
            self.monitor = DriftMonitor(settings, sinks=sinks)
        else:
            self.monitor = DriftMonitor.restore(settings, saved["monitor"], sinks=sinks)
            self.offsets = dict(saved["offsets"])
            log.info("drift follower resumed", extra={"path": str(self.checkpoint_path),
                                                       "events": self.monitor.global_index})
        self.observed_this_run = 0
        self._consumer = None
        self._last_checkpoint = time.monotonic()

    def checkpoint(self) -> None:
        """Write the monitor and the offsets together, then commit the same offsets to Kafka."""
        payload = {"version": CHECKPOINT_VERSION, "monitor": self.monitor.snapshot(), "offsets": dict(self.offsets),
                   "written_at": time.time()}
        write_atomic(self.checkpoint_path, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
        self._last_checkpoint = time.monotonic()
        if self._consumer is not None:
            self._consumer.commit_saved(self.offsets)

    def observe(self, batch) -> None:
        """Feed one polled batch in order; records below a saved offset (redeliveries) are skipped."""
        for record in batch.records:
            key = (record.topic, record.partition)
            if record.offset < self.offsets.get(key, 0):
                continue
            self.monitor.observe(record.event)
            self.offsets[key] = record.offset + 1
            self.observed_this_run += 1
        for tp, offset in batch.offsets.items():  # dead-lettered records move the position too
            key = (tp.topic, tp.partition)
            self.offsets[key] = max(self.offsets.get(key, 0), offset)

    def run(self) -> dict[str, Any]:
        from streams.consumer import EventConsumer, seek_to_saved

        consumer = EventConsumer(self.settings, self.group, seek_on_assign=seek_to_saved(self.offsets),
                                 on_revoked=lambda _: self.checkpoint(), max_records=2000, poll_timeout_ms=200)
        self._consumer = consumer
        last_data, stopped = time.monotonic(), "signal"
        try:
            while not consumer.stopping:
                batch = consumer.poll()
                if batch.records or batch.offsets:
                    self.observe(batch)
                    last_data = time.monotonic()
                elif not consumer.assigned:
                    last_data = time.monotonic()
                elif self.idle_timeout_s is not None and time.monotonic() - last_data > self.idle_timeout_s:
                    stopped = "idle"
                    break
                if time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds:
                    self.checkpoint()
                if self.max_events is not None and self.observed_this_run >= self.max_events:
                    stopped = "max_events"
                    break
            self.checkpoint()
        finally:
            consumer.close()
            self._consumer = None
            self.monitor.close()
        return {"events": self.monitor.global_index, "observed_this_run": self.observed_this_run,
                "drift_events": len(self.monitor.events), "checkpoint": str(self.checkpoint_path), "stopped": stopped}


__all__ = ["DriftFollower"]
