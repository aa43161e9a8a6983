"""Structured logs: one JSON object per line on stderr, with any ``extra=`` fields merged in."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


def configure_logging(level: str | None = None) -> None:
    """Route the root logger to stderr as JSON lines (idempotent). Level from FEDSTREAM_LOG_LEVEL."""
    root = logging.getLogger()
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level or os.environ.get("FEDSTREAM_LOG_LEVEL", "WARNING").upper())
    # kafka-python logs every refused connection at ERROR; our own errors say what matters.
    logging.getLogger("kafka").setLevel(os.environ.get("FEDSTREAM_KAFKA_LOG_LEVEL", "CRITICAL").upper())
    logging.getLogger("fedstream").setLevel(level or os.environ.get("FEDSTREAM_LOG_LEVEL", "INFO").upper())


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``fedstream`` namespace."""
    return logging.getLogger(f"fedstream.{name}")
