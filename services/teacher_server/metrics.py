"""Prometheus metrics of the teacher: the shared HTTP ones plus the batcher's."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.http import HttpMetrics
from services.teacher_server.batcher import BatchStats

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class Metrics(HttpMetrics, BatchStats):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
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
