"""The trainer's side of its rollout server: bounded retries, and sampling only ever from the trainer's weights.

A rollout server is a separate process that can die and come back (a crash, a rolling restart, a preempted node).
Without this, a killed server ended the run with one line of `RemoteProtocolError`, and a server restarted between a
weight push and the next generation served its initial weights for a step, silently. So every call here has the
client's timeout and is retried with full-jitter backoff on transport errors and 5xx answers (a 4xx is our fault and
raises at once): `retries` times at least, then until the call has failed for `retry_budget_s`, the time a server
takes to restart and load its model (a count alone ended one run in three: trainer.retry.RetryPolicy). Every
generation's `weight_version` is checked against the last push: on a mismatch the last weights are pushed again and
the request is sampled again, and `repushes` counts it.

The last pushed payload stays in memory (one serialized copy of the student on the main process) so that a restarted
server can be given it without gathering the weights again. Weights sent through vLLM's weight-transfer engine
(trainer.weight_sync) leave no payload: the push is recorded with a way to send it again, which exists for one
trainer process only (with several, the others would have to gather with it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from proto.client import RolloutClient
from proto.errors import ApiError
from proto.rollout import GenerateRequest, RolloutInfo, Rollouts, WeightsLoaded
from trainer.retry import RetryPolicy

log = logging.getLogger("uniopd.train")
T = TypeVar("T")


class RolloutUnavailable(RuntimeError):
    """The rollout server did not answer within the retries; the message says which server, what, for how long and
    why."""


class RolloutSession:
    def __init__(self, client: RolloutClient, url: str, retries: int, backoff_s: float,
                 backoff_cap_s: float = 10.0, retry_budget_s: float = 0.0) -> None:
        self.client, self.url = client, url
        self.retry = RetryPolicy(retries, backoff_s, backoff_cap_s, retry_budget_s)
        self.payload: bytes | bytearray | None = None
        self.resend: Callable[[], Awaitable[WeightsLoaded]] | None = None  # the last transfer again; see the docstring
        self.version: int | None = None  # what the last push returned
        self.call_retries = 0
        self.repushes = 0

    async def info(self) -> RolloutInfo:
        return await self._retrying("info", self.client.info)

    async def push_weights(self, payload: bytes | bytearray) -> WeightsLoaded:
        loaded = await self._retrying("weight push", lambda: self.client.push_weights(payload))
        self.payload, self.version = payload, loaded.weight_version
        return loaded

    def transferred(self, loaded: WeightsLoaded, resend: Callable[[], Awaitable[WeightsLoaded]] | None) -> None:
        """A push through vLLM's weight-transfer engine: its version, and how to send the same weights again."""
        self.payload, self.version, self.resend = None, loaded.weight_version, resend

    async def generate(self, request: GenerateRequest) -> Rollouts:
        out = await self._retrying("generate", lambda: self.client.generate(request))
        if self.version is None or out.weight_version == self.version:
            return out
        log.warning("rollout server %s sampled with weight version %d, the last push made %d (restarted?): pushing "
                    "the weights again and sampling again", self.url, out.weight_version, self.version)
        self.repushes += 1
        await self._push_again()
        out = await self._retrying("generate", lambda: self.client.generate(request))
        if out.weight_version != self.version:
            raise RolloutUnavailable(f"rollout server {self.url} sampled with weight version {out.weight_version} "
                                     f"right after a push that made {self.version}: does another trainer push to it?")
        return out

    async def _push_again(self) -> None:
        if self.payload is not None:
            await self.push_weights(self.payload)
        elif self.resend is not None:
            self.version = (await self.resend()).weight_version
        else:
            raise RolloutUnavailable(f"rollout server {self.url} restarted: weights sent through the weight-transfer "
                                     "engine by several trainer processes cannot be sent again by the main process "
                                     "alone; continue from the last checkpoint with --resume")

    def metrics(self) -> dict[str, float]:
        return {"rollout/retries": self.call_retries, "rollout/repushes": self.repushes}

    async def aclose(self) -> None:
        await self.client.aclose()

    async def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        first_failure: float | None = None
        for attempt in itertools.count(1):
            try:
                return await call()
            except httpx.TransportError as exc:  # refused, reset, timed out: the server is down or restarting
                error = f"{type(exc).__name__}: {exc}"
            except ApiError as exc:
                if exc.status < 500:
                    raise
                error = f"{exc.status} {exc.code}: {exc.message}"  # 503 while a restarted server loads its model
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            failing_s = now - first_failure
            wait = self.retry.wait(attempt, failing_s, random.random())
            if wait is None:
                raise RolloutUnavailable(
                    f"rollout server {self.url}: {what} failed {attempt} times over {failing_s:.1f} s (retry budget "
                    f"{self.retry.budget_s:g} s; last: {error}); is it running? The run can continue from its last "
                    "checkpoint with --resume")
            log.warning("rollout server %s: %s failed (attempt %d, failing for %.1f s): %s; retrying in %.1f s",
                        self.url, what, attempt, failing_s, error, wait)
            self.call_retries += 1
            await asyncio.sleep(wait)
