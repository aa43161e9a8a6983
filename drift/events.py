"""What a drift detector says when it fires: one :class:`DriftEvent`, serialized as JSON with msgspec.

The same bytes go to the drift topic (keyed by merchant), to the local JSONL log under the data dir
and, as metrics and tags, to MLflow, so every reader sees identical fields.

Example:
    >>> event = DriftEvent(merchant_id="m1", model_version="3", detector="label.ctr", statistic="z",
    ...                    value=7.5, threshold=6.0, window_start_index=100, window_end_index=1600,
    ...                    window_start_time=1.7e9, window_end_time=1.7e9 + 60, event_index=1600,
    ...                    detected_at=1.7e9 + 61)
    >>> decode_drift_event(encode_drift_event(event)) == event
    True
    >>> event.family
    'label'
"""

from __future__ import annotations

import time

import msgspec


class DriftEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One detected change in one merchant's stream.

    ``window_*`` bound the data the detector compared (the post-change window, in the merchant's own
    event index and in event time); ``event_index`` is the merchant's event count when it fired and
    ``global_index`` the platform-wide count (clicks + orders) when known, else -1.
    """

    merchant_id: str
    detector: str
    statistic: str
    value: float
    threshold: float
    window_start_index: int
    window_end_index: int
    window_start_time: float
    window_end_time: float
    event_index: int
    detected_at: float = msgspec.field(default_factory=time.time)
    model_version: str | None = None
    global_index: int = -1
    details: dict[str, float] = msgspec.field(default_factory=dict)

    @property
    def family(self) -> str:
        """``error``, ``label`` or ``feature``: the first part of the detector name."""
        return self.detector.split(".", 1)[0]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DriftEvent)


def encode_drift_event(event: DriftEvent) -> bytes:
    """Canonical JSON bytes of a drift event."""
    return _encoder.encode(event)


def decode_drift_event(raw: bytes | str) -> DriftEvent:
    """Parse and validate one drift event; raises ``msgspec.ValidationError``/``DecodeError`` on bad input."""
    return _decoder.decode(raw)


def to_dict(event: DriftEvent) -> dict:
    """Plain JSON-ready dict (what the serving API returns)."""
    return msgspec.to_builtins(event)
