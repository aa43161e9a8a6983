"""Hostile-input limits: request bodies bounded while they stream in, per-key rate limits.

:class:`BodyLimitMiddleware` counts the bytes of a request body as the server hands them over; the first
chunk past the limit ends the read with 413, so a body without Content-Length (chunked) is never
buffered whole. Nothing reads a body before the key was checked (see :mod:`serving.deps`), so an
unauthenticated client gets 401 without its body being read at all.

:class:`RateLimiter` is a token bucket per API key id: ``rate`` requests per second on average, bursts
up to ``burst``; an empty bucket answers 429 with ``Retry-After`` (whole seconds until a token is back).
"""

from __future__ import annotations

import math
import threading
import time

from fastapi import HTTPException


class BodyTooLarge(HTTPException):
    """413: the body is (or says it is) longer than the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is over the {limit}-byte limit")


class BodyLimitMiddleware:
    """ASGI middleware: a request body longer than ``limit`` bytes stops being read at the first chunk past it."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, seen = self.limit, 0
        declared = declared_length(scope)

        async def bounded_receive():
            nonlocal seen
            if declared is not None and declared > limit:
                raise BodyTooLarge(limit)
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, bounded_receive, send)


def declared_length(scope) -> int | None:
    """The request's Content-Length, or None when absent or not a number."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RateLimiter:
    """Token buckets by key id; :meth:`check` takes one token or raises 429 with ``Retry-After``
    (:meth:`take` is the same without raising)."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._lock = threading.Lock()

    def check(self, key_id: str) -> None:
        wait = self.take(key_id)
        if wait is not None:
            raise HTTPException(429, f"rate limit of {self.rate:g} requests/s (burst {self.burst}) for this key; "
                                     f"retry in {wait} s", headers={"Retry-After": str(wait)})

    def take(self, key_id: str) -> int | None:
        """Take one token: None when taken, else the whole seconds until one is back (nothing taken)."""
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1.0:
                self._buckets[key_id] = (tokens, now)
                return max(1, math.ceil((1.0 - tokens) / self.rate))
            self._buckets[key_id] = (tokens - 1.0, now)
            return None
