"""Prometheus metrics of the serving API, on a registry of their own (several apps can live in one process).

``MetricsMiddleware`` is a plain ASGI middleware (no per-request task or body buffering, unlike
``BaseHTTPMiddleware``) that counts requests and times them per *route template*, so
``/v1/merchants/{merchant_id}/recommendations`` is one series whatever the merchant.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class ServingMetrics:
    """Request counts and latencies, the served model version, hot swaps and ingested/rejected events."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("fedstream_http_requests_total", "HTTP requests by method, route and status.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("fedstream_http_request_duration_seconds", "HTTP request latency by route.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.model_version = Gauge("fedstream_model_version", "Version of the model being served (0: none).",
                                   ["model"], registry=self.registry)
        self.model_loaded_at = Gauge("fedstream_model_loaded_timestamp_seconds", "When the served model was loaded.",
                                     ["model"], registry=self.registry)
        self.swaps = Counter("fedstream_model_swaps_total", "Hot swaps of the served model.", ["model"],
                             registry=self.registry)
        self.swap_failures = Counter("fedstream_model_swap_failures_total",
                                     "Failed attempts to load a new champion (the old one keeps serving).",
                                     ["model"], registry=self.registry)
        self.events = Counter("fedstream_events_ingested_total", "Events accepted and produced to Kafka.",
                              ["type"], registry=self.registry)
        self.rejected = Counter("fedstream_events_rejected_total", "Events rejected at the API, by reason.",
                                ["reason"], registry=self.registry)


class MetricsMiddleware:
    """ASGI middleware recording ``requests`` and ``latency`` of every HTTP request."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_remember(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_remember)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(scope["method"], path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
