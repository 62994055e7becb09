"""Prometheus metrics of one server instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.teacher_server.batcher import BatchStats

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class Metrics(BatchStats):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("uniopd_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("uniopd_request_latency_seconds", "Request latency by route", ["route"], registry=r)
        self.scored_tokens = Counter("uniopd_scored_tokens", "Response tokens scored", registry=r)
        self.batch_items = Histogram("uniopd_batch_items", "Items per scorer call", buckets=_SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("uniopd_batch_requests", "Requests coalesced into one scorer call",
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("uniopd_batch_tokens", "Tokens per scorer call", buckets=_TOKEN_BUCKETS,
                                      registry=r)
        self.queue = Gauge("uniopd_queue_depth", "Items queued or being scored", registry=r)

    def batch(self, items: int, requests: int, tokens: int) -> None:
        self.batch_items.observe(items)
        self.batch_requests.observe(requests)
        self.batch_tokens.observe(tokens)

    def queue_depth(self, items: int) -> None:
        self.queue.set(items)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response by route template and status; unknown paths share one label (fuzzers can't blow it up)."""

    def __init__(self, app, metrics: Metrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
