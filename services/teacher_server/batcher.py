"""Server-side micro-batching: items of concurrent requests are coalesced into one scorer call under a token budget.

Requests are split into items; the worker waits up to `max_wait_s` after the first arrival (or until the budget is
full), scores the batch on a single worker thread (so the event loop keeps accepting requests), and hands every
request its results once all of its items are done. The queue is bounded in items; a full queue refuses at once,
except a team holding less than its share of the bound (the bound over the teams with items in flight): a team that
fills the queue cannot lock the others out. That admits at most one extra bound's worth of items in all.
Items wait in per-team queues, and a batch takes them by deficit round robin over tokens (see fair_queue.py), so a
team flooding the server delays another team's requests by about one turn, not by its whole backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from proto.codec import ScoredSpan
from proto.schemas import ScoreItem
from services.teacher_server.fair_queue import FairQueue


class QueueFull(Exception):
    pass


class BatchStats:
    """Hook the metrics module implements; kept as a tiny interface so the batcher has no Prometheus import."""

    def batch(self, items: int, requests: int, tokens: int) -> None: ...

    def queue_depth(self, items: int) -> None: ...


@dataclass
class _Job:
    items: Sequence[ScoreItem]
    images: Sequence[tuple] | None  # per item, its decoded images; None for a request without images
    future: asyncio.Future
    team: str
    results: list[ScoredSpan | None] = field(default_factory=list)
    remaining: int = 0


class MicroBatcher:
    def __init__(self, score: Callable[[list[ScoreItem], list[tuple] | None], list[ScoredSpan]], max_batch_tokens: int,
                 max_wait_s: float, max_queue_items: int, stats: BatchStats | None = None) -> None:
        self._score = score
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue_items = max_queue_items
        self._stats = stats or BatchStats()
        # A team's credit per turn is a quarter batch (× its weight): a batch interleaves a few teams' turns.
        self._queue: FairQueue[tuple[_Job, int]] = FairQueue(max_batch_tokens // 4)
        self._in_flight = 0  # items queued or being scored: what the queue bound counts
        self._team_in_flight: Counter[str] = Counter()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self._in_flight

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    def run_in_worker(self, fn: Callable, *args):
        """Run `fn` on the scoring thread (model loading must happen on the thread that later scores)."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, items: Sequence[ScoreItem], team: str, weight: int,
                     images: Sequence[tuple] | None = None) -> list[ScoredSpan]:
        """Queue the items in `team`'s lane (served in turn with other teams, by `weight`) and wait for their scores."""
        if not self._admits(team, len(items)):
            raise QueueFull(f"{self._in_flight} items queued; limit {self.max_queue_items}")
        job = _Job(items, images, asyncio.get_running_loop().create_future(), team, [None] * len(items), len(items))
        for i, it in enumerate(items):
            self._queue.push(team, weight, (job, i), len(it.input_ids))
        self._in_flight += len(items)
        self._team_in_flight[team] += len(items)
        self._stats.queue_depth(self._in_flight)
        self._arrived.set()
        try:
            return await job.future
        finally:
            if not job.future.done():  # caller went away: let the worker skip what is still queued
                job.future.cancel()

    def _admits(self, team: str, n: int) -> bool:
        if self._in_flight + n <= self.max_queue_items:
            return True
        active = {t for t, c in self._team_in_flight.items() if c} | {team}
        return self._team_in_flight[team] + n <= self.max_queue_items // len(active)

    async def _gather(self) -> list[tuple[_Job, int]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while self._queue.tokens < self.max_batch_tokens and (left := deadline - loop.time()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        batch, tokens = [], 0
        while self._queue:
            (job, i), n = self._queue.peek()
            if batch and tokens + n > self.max_batch_tokens:
                break
            self._queue.pop()
            if job.future.done():
                self._release([job])
                continue
            batch.append((job, i))
            tokens += n
        return batch

    def _release(self, jobs: list[_Job]) -> None:
        """One entry per item leaving the queue (scored or skipped)."""
        self._in_flight -= len(jobs)
        self._team_in_flight.subtract(job.team for job in jobs)
        self._stats.queue_depth(self._in_flight)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            if not batch:
                continue
            items = [job.items[i] for job, i in batch]
            images = [job.images[i] if job.images else () for job, i in batch]
            jobs = {id(job): job for job, _ in batch}
            self._stats.batch(len(items), len(jobs), sum(len(it.input_ids) for it in items))
            try:
                spans = await loop.run_in_executor(self._executor, self._score, items,
                                                   images if any(images) else None)
            except Exception as exc:
                for job in jobs.values():
                    if not job.future.done():
                        job.future.set_exception(exc)
            else:
                for (job, i), span in zip(batch, spans, strict=True):
                    job.results[i] = span
                    job.remaining -= 1
                    if job.remaining == 0 and not job.future.done():
                        job.future.set_result(job.results)
            finally:
                self._release([job for job, _ in batch])
