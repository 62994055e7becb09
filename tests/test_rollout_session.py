"""The trainer survives its rollout server: calls are retried through a restart, and a restarted server (back on its
initial weights) gets the last weights again before its samples are used. The real rollout app in-process, over a
transport that can 'kill' it: the next requests fail in transport, then a fresh app answers."""

from __future__ import annotations

import contextlib
import logging
import re
import time

import httpx
import pytest

from proto.client import RolloutClient
from proto.errors import ApiError
from proto.rollout import GenerateRequest, WeightsLoaded
from services.rollout_server.app import create_app
from tests.doubles import GeneratorDouble
from tests.inprocess import BASE_URL, transport, wait_loaded
from trainer.rollout_session import RolloutSession, RolloutUnavailable

ADMIN = "admin-key-0123"
REQUEST = GenerateRequest(prompts=[[5, 6, 7], [8, 9]], n=2, max_tokens=6, seed=11)


class KillableTransport(httpx.AsyncBaseTransport):
    """Routes to `app`; while `down` > 0 each request fails the way a killed server's does, and until the monotonic
    time `down_until` each is refused the way a restarting one's is."""

    def __init__(self, app) -> None:
        self.app, self.down, self.down_until = app, 0, 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            self.down -= 1
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        if time.monotonic() < self.down_until:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await transport(self.app).handle_async_request(request)


@contextlib.asynccontextmanager
async def rollout_apps(tiny_model, count: int):
    """`count` rollout apps over generator doubles, each started and loaded: one server and its restarts."""
    async with contextlib.AsyncExitStack() as stack:
        apps = [create_app(lambda: GeneratorDouble(), tiny_model, admin_keys=[ADMIN]) for _ in range(count)]
        for app in apps:
            await stack.enter_async_context(app.router.lifespan_context(app))
            await wait_loaded(app)
        yield apps


def session_over(route: httpx.AsyncBaseTransport, retries: int = 3, **retry) -> RolloutSession:
    return RolloutSession(RolloutClient(BASE_URL, admin_key=ADMIN, transport=route), BASE_URL, retries,
                          **{"backoff_s": 0, **retry})


async def test_a_restarted_server_gets_the_weights_again_before_its_samples_count(tiny_model):
    weights = (tiny_model / "model.safetensors").read_bytes()
    async with rollout_apps(tiny_model, 2) as (first, restarted):
        route = KillableTransport(first)
        session = session_over(route)
        assert (await session.push_weights(weights)).weight_version == 1
        before = await session.generate(REQUEST)
        route.app, route.down = restarted, 2  # killed mid-call; back up with its initial weights (version 0)
        after = await session.generate(REQUEST)
        await session.aclose()
    assert after.weight_version == before.weight_version == 1
    assert session.call_retries == 2 and session.repushes == 1
    assert session.metrics() == {"rollout/retries": 2, "rollout/repushes": 1}
    assert len(restarted.state.service.generator.loaded) == 1  # the restarted server got the weights once
    assert [[s.token_ids.tolist() for s in g] for g in after.samples] == \
        [[s.token_ids.tolist() for s in g] for g in before.samples]  # the same weights and seed sample the same


async def test_a_server_that_stays_down_ends_the_run_with_a_message_that_says_so(tiny_model):
    async with rollout_apps(tiny_model, 1) as (app,):
        route = KillableTransport(app)
        route.down = 10
        session = session_over(route, retries=2)
        with pytest.raises(RolloutUnavailable, match=r"generate failed 3 times over \d+\.\d s \(retry budget 0 s; "
                                                     r"last: RemoteProtocolError.*--resume"):
            await session.generate(REQUEST)
        await session.aclose()
    assert session.call_retries == 2


async def test_a_server_down_longer_than_its_retries_is_waited_for_within_the_retry_budget(tiny_model, caplog):
    """One retry alone gives up within milliseconds; the budget keeps retrying until the server is back."""
    async with rollout_apps(tiny_model, 1) as (app,):
        route = KillableTransport(app)
        session = session_over(route, retries=1, backoff_s=0.01, backoff_cap_s=0.05, retry_budget_s=30)
        route.down_until = time.monotonic() + 0.3
        with caplog.at_level(logging.WARNING, logger="uniopd.train"):
            out = await session.generate(REQUEST)
        await session.aclose()
    assert out.weight_version == 0 and session.call_retries >= 3
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == session.call_retries  # one line a retry: which attempt failed, for how long, the wait
    assert all(re.search(rf"generate failed \(attempt {i}, failing for \d+\.\d s\): ConnectError: .*; retrying in "
                         r"\d+\.\d s", line) for i, line in enumerate(lines, 1)), lines


async def test_a_server_down_past_the_budget_ends_the_run_naming_the_attempts_and_the_time(tiny_model):
    async with rollout_apps(tiny_model, 1) as (app,):
        route = KillableTransport(app)
        route.down_until = time.monotonic() + 3600
        session = session_over(route, retries=1, backoff_s=0.01, backoff_cap_s=0.05, retry_budget_s=0.3)
        with pytest.raises(RolloutUnavailable) as err:
            await session.info()
        await session.aclose()
    said = re.search(r"info failed (\d+) times over (\d+\.\d) s \(retry budget 0\.3 s; last: ConnectError",
                     str(err.value))
    assert said, err.value
    assert int(said[1]) == session.call_retries + 1 > 2 and float(said[2]) >= 0.3


async def test_a_rejected_request_is_not_retried(tiny_model):
    async with rollout_apps(tiny_model, 1) as (app,):
        session = session_over(KillableTransport(app))
        with pytest.raises(ApiError) as err:
            await session.generate(GenerateRequest(prompts=[[5, 600]], max_tokens=4))  # a token outside the vocab
        await session.aclose()
    assert err.value.status == 422 and session.call_retries == 0


async def test_weights_sent_through_the_transfer_engine_are_sent_again_to_a_restarted_server(tiny_model):
    """rollout.weight_sync gloo/nccl keeps no payload: a restarted server gets the weights through `resend` (one
    trainer process re-forms the group and sends them), and with several processes the run stops saying why."""
    weights = (tiny_model / "model.safetensors").read_bytes()
    async with rollout_apps(tiny_model, 3) as (first, restarted, again):
        route = KillableTransport(first)
        session = session_over(route)
        sent = []

        async def resend() -> WeightsLoaded:
            sent.append(route.app)
            return await session.client.push_weights(weights)  # stands in for the engine's round

        session.transferred(await session.client.push_weights(weights), resend)
        before = await session.generate(REQUEST)
        route.app = restarted
        after = await session.generate(REQUEST)
        session.transferred(WeightsLoaded(weight_version=after.weight_version, tensors=1, bytes=1), None)
        route.app = again
        with pytest.raises(RolloutUnavailable, match=r"several trainer processes .*--resume"):
            await session.generate(REQUEST)
        await session.aclose()
    assert sent == [restarted] and session.repushes == 2 and session.payload is None
    assert after.weight_version == before.weight_version == 1
