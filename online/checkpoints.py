"""The learner worker's checkpoint writer: one whole checkpoint at a time (a file or an S3 object, see
:mod:`online.store`), written in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Offsets = dict[tuple[str, int], int]


class CheckpointWriter:
    """Writes serialized learner state with ``sink`` and commits its offsets once it is safe.

    The caller serializes between blocks and hands over the bytes; ``sink`` writes them whole (a file:
    temp file, fsync, ``os.replace``; S3: one PUT) in a background thread while learning goes on. The offsets are committed by
    ``commit_offsets`` (the consumer's ``commit_saved``; ``None``: nothing to commit to) from the caller's
    thread, at a later :meth:`collect`, because the consumer is not thread-safe.
    """

    def __init__(self, sink: Callable[[bytes], None], every_events: int, every_seconds: float, events: int) -> None:
        self.sink = sink
        self.every_events = every_events
        self.every_seconds = every_seconds
        self.commit_offsets: Callable[[Offsets], None] | None = None
        self._last_events = events
        self._last_time = time.monotonic()
        self._writing: tuple[threading.Thread, Offsets, bool, list[BaseException]] | None = None

    def due(self, events: int) -> bool:
        """Whether ``checkpoint_every`` events or (with anything new learned) ``checkpoint_seconds`` passed."""
        due_events = events - self._last_events >= self.every_events
        due_time = time.monotonic() - self._last_time >= self.every_seconds
        return due_events or (due_time and events != self._last_events)

    def write(self, payload: bytes, offsets: Offsets, events: int, commit: bool = True, wait: bool = True) -> None:
        """Start writing ``payload`` after the write in flight (one at a time, in order); ``wait``: finish it."""
        self.collect(wait=True)
        failure: list[BaseException] = []

        def write() -> None:
            try:
                self.sink(payload)
            except BaseException as exc:  # re-raised by collect() in the learning thread
                failure.append(exc)

        writer = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        writer.start()
        self._writing = (writer, offsets, commit, failure)
        self._last_events = events
        self._last_time = time.monotonic()
        if wait:
            self.collect(wait=True)

    def collect(self, wait: bool = False) -> None:
        """Finish a background write: raise its error, or commit its offsets (``wait``: block until written)."""
        if self._writing is None:
            return
        writer, offsets, commit, failure = self._writing
        if not wait and writer.is_alive():
            return
        writer.join()
        self._writing = None
        if failure:
            raise failure[0]
        if commit and self.commit_offsets is not None:
            self.commit_offsets(offsets)

    def abandon(self) -> None:
        """Let a write in flight land without committing its offsets (an error stopped the loop)."""
        if self._writing is not None:
            self._writing[0].join()
            self._writing = None


__all__ = ["CheckpointWriter"]
