"""Prometheus metrics of the teacher: the shared HTTP ones, the batcher's, and per-team usage (by team name, never
by key)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.http import HttpMetrics
from services.teacher_server.batcher import BatchStats
from services.teacher_server.quotas import QuotaStats

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_TOKEN_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144)


class Metrics(HttpMetrics, BatchStats, QuotaStats):
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
        self.team_requests = Counter("uniopd_team_requests", "Scoring requests admitted, by team", ["team"],
                                     registry=r)
        self.team_scored_tokens = Counter("uniopd_team_scored_tokens", "Response tokens scored, by team", ["team"],
                                          registry=r)
        self.team_rejected = Counter("uniopd_team_rejected", "Scoring requests refused with 429, by team and reason "
                                     "(tokens_per_minute, max_concurrent, queue_full)", ["team", "reason"],
                                     registry=r)

    def batch(self, items: int, requests: int, tokens: int) -> None:
        self.batch_items.observe(items)
        self.batch_requests.observe(requests)
        self.batch_tokens.observe(tokens)

    def queue_depth(self, items: int) -> None:
        self.queue.set(items)

    def admitted(self, team: str) -> None:
        self.team_requests.labels(team).inc()

    def rejected(self, team: str, reason: str) -> None:
        self.team_rejected.labels(team, reason).inc()

    def scored(self, team: str, tokens: int) -> None:
        self.team_scored_tokens.labels(team).inc(tokens)
