"""Retries with a time budget (trainer.retry.RetryPolicy): the schedule over a fake clock, its config, and a
real rollout server killed mid-request and back 20 s later (e2e)."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from proto.client import RolloutClient
from proto.rollout import GenerateRequest
from trainer.config import RETRY_BUDGET_S, RolloutConfig, RunConfig, TeacherClientConfig
from trainer.config_fields import validation_message
from trainer.retry import RetryPolicy, backoff_delay
from trainer.rollout_session import RolloutSession
from trainer.teacher_router import TeacherRouter
from uniopd.launch import spawn, start_rollout, wait_ready

ROLLOUT = RolloutConfig(url="http://rollout:8100")
TEACHER = TeacherClientConfig()
CAPS = {"rollout": inspect.signature(RolloutSession).parameters["backoff_cap_s"].default,  # what the trainer uses
        "teacher": inspect.signature(TeacherRouter).parameters["backoff_cap_s"].default}


def policy(config: RolloutConfig | TeacherClientConfig, cap_s: float) -> RetryPolicy:
    return RetryPolicy(config.retries, config.backoff_s, cap_s, config.retry_budget_s)


def failing_calls(retry: RetryPolicy, draws: Iterator[float], attempt_s: float = 0.0) -> tuple[int, list[float]]:
    """A fake clock over a call whose every attempt fails after `attempt_s`: the attempts made and the waits."""
    clock, waits = attempt_s, []  # the first attempt failed at attempt_s
    while (wait := retry.wait(len(waits) + 1, clock - attempt_s, next(draws))) is not None:
        waits.append(wait)
        clock += wait + attempt_s
    return len(waits) + 1, waits


def draws(seed: int) -> Iterator[float]:
    rng = np.random.default_rng(seed)
    return iter(lambda: float(rng.random()), None)


def test_six_retries_alone_wait_less_than_25_s_one_time_in_three():
    """The issue: the rollout's old count (6 retries from 1 s, capped at 30 s) averages 30.5 s of waiting and is
    below 25 s with probability 0.32, so a server 20-25 s from back ended one run in three."""
    alone = RetryPolicy(ROLLOUT.retries, ROLLOUT.backoff_s, 30.0)
    totals = np.array([sum(failing_calls(alone, draws(seed))[1]) for seed in range(4000)])
    assert totals.mean() == pytest.approx(30.5, abs=0.6)
    assert (totals < 25).mean() == pytest.approx(0.32, abs=0.03)


@pytest.mark.parametrize("side", ["rollout", "teacher"])
@pytest.mark.parametrize("attempt_s", [0.0, 5.0])  # refused at once; timed out after 5 s
def test_the_default_schedule_keeps_trying_until_its_budget_is_spent(side, attempt_s):
    retry = policy(ROLLOUT if side == "rollout" else TEACHER, CAPS[side])
    assert retry.budget_s == RETRY_BUDGET_S >= 2 * 25  # twice the slowest restart
    for seed in range(300):
        attempts, waits = failing_calls(retry, draws(seed), attempt_s)
        failing_s = sum(waits) + attempt_s * (attempts - 1)  # from the first failure to the last
        assert attempts >= retry.retries + 1 and all(w < retry.cap_s for w in waits)
        assert retry.budget_s <= failing_s < retry.budget_s + retry.cap_s + attempt_s


def test_the_budget_never_cuts_the_minimum_retries_and_zero_is_retries_alone():
    for budget_s in (0.0, 1e-3):
        attempts, waits = failing_calls(RetryPolicy(4, 0.5, 10.0, budget_s), itertools.repeat(0.5))
        assert attempts == 5 and waits == [backoff_delay(k, 0.5, 10.0, 0.5) for k in range(4)]
    attempts, waits = failing_calls(RetryPolicy(1, 1.0, 30.0, 10.0), itertools.repeat(0.5))
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0] and attempts == 6  # failing for 7.5 s < 10 s: one more wait


def test_a_retry_budget_without_backoff_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="backoff_s > 0"):
        RetryPolicy(3, 0.0, 30.0, 60.0)
    tree = {"student": {"model": "m"}, "data": {"train": ["t.jsonl"]}, "teachers": {"math": {"urls": ["http://t"]}},
            "rollout": {"url": "http://r", "backoff_s": 0}, "teacher_client": {"retry_budget_s": -1}}
    with pytest.raises(ValidationError) as err:
        RunConfig.model_validate(tree)
    assert validation_message(err.value).splitlines() == [
        f"rollout: retry_budget_s is {RETRY_BUDGET_S:g} s but backoff_s is 0: its retries would never wait (give "
        "backoff_s > 0, or retry_budget_s: 0 for `retries` alone)",
        "teacher_client.retry_budget_s: Input should be greater than or equal to 0"]
    RolloutConfig(url="http://r", backoff_s=0, retry_budget_s=0)  # an old config without backoff stays valid so


@pytest.mark.e2e
async def test_a_rollout_server_killed_mid_request_and_back_20_s_later_is_survived(tiny_model, tmp_path: Path):
    """The trainer's defaults with one retry, so that the budget, not the count, carries the session over the
    restart (and a 5 s backoff cap, so that the test notices the server back sooner); the restarted server gets the
    last weights again before its samples count."""
    (tmp_path / "admin").write_text("admin-key-0123")
    config = RolloutConfig(url="http://rollout:8100", retries=1)
    server = start_rollout(tiny_model, "hf", ["--admin-keys", str(tmp_path / "admin")], log_dir=tmp_path)
    restarted = None
    client = RolloutClient(server.url, admin_key="admin-key-0123", timeout=config.timeout_s)
    session = RolloutSession(client, server.url, config.retries, config.backoff_s, backoff_cap_s=5.0,
                             retry_budget_s=config.retry_budget_s)
    try:
        await session.push_weights((tiny_model / "model.safetensors").read_bytes())
        request = GenerateRequest(prompts=[[5, 6, 7, 8]] * 4, n=4, max_tokens=64, seed=3)
        generating = asyncio.create_task(session.generate(request))
        async with httpx.AsyncClient() as http:
            while "uniopd_pending_requests 1.0" not in (await http.get(f"{server.url}/metrics")).text:
                assert not generating.done()
                await asyncio.sleep(0.05)
        server.proc.send_signal(signal.SIGKILL)  # while it samples
        server.proc.wait()
        await asyncio.sleep(20)
        port = int(server.url.rsplit(":", 1)[1])
        restarted = await asyncio.to_thread(lambda: wait_ready(spawn(
            server.proc.args, port, tmp_path / "restarted.log", "rollout server")))
        out = await generating
    finally:
        await session.aclose()
        for s in (server, restarted):
            if s is not None:
                s.stop()
    assert out.weight_version == 1 and session.repushes == 1 and session.call_retries > config.retries
