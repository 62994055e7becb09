"""TeacherRouter driven through an httpx.MockTransport: routing, cache, retries, failover, the circuit breaker and the
handshake, in-process and with exact failure scripts.

Each teacher URL is either a real teacher app (create_app over a ScorerDouble, called over httpx.ASGITransport) or a
scripted failure (connection refused, 5xx, 429 with Retry-After, a 4xx rejection, an undecodable or mismatched body, a
timeout). Real teacher processes and a real redis-server: the e2e tier's test_teacher_router.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import numpy as np
import pytest

from proto.codec import ScoredSpan, decode_score_request, encode_score_response
from proto.schemas import MSGPACK, ScoreItem
from services.teacher_server.app import create_app
from services.teacher_server.limits import Limits
from tests.conftest import random_items
from tests.doubles import ScorerDouble
from tests.inprocess import transport, wait_loaded
from trainer.score_cache import MEMORY_URL, ScoreCache
from trainer.teacher_router import (
    Endpoint,
    FingerprintMismatch,
    TeacherRouter,
    TeacherUnavailable,
    TokenizerMismatch,
)

MATH, CODE, SPARE = "http://math-teacher:8101", "http://code-teacher:8102", "http://math-spare:8101"
STUDENT = "tok-double"  # the doubles' tokenizer fingerprint
FAST = dict(timeout_s=5.0, backoff_s=0.0, backoff_cap_s=0.0)

Handler = Callable[[httpx.Request], httpx.Response | Awaitable[httpx.Response]]


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def refused_until(back_at: float, handler: Handler) -> Handler:
    """A teacher restarting: connections refused until the monotonic time `back_at`, then `handler` answers."""
    def handle(request: httpx.Request) -> httpx.Response | Awaitable[httpx.Response]:
        return refused(request) if time.monotonic() < back_at else handler(request)

    return handle


def api_error(status: int, code: str, headers: dict[str, str] | None = None, field: str | None = None):
    def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"code": code, "message": code, "field": field}},
                              headers=headers)

    return respond


class Network:
    """What the router's MockTransport reaches: per URL a teacher app in-process, or a failure. `script(url, ...)`
    answers that URL's next /v1/score calls with the given handlers, then lets them through again."""

    def __init__(self, stack: contextlib.AsyncExitStack) -> None:
        self._stack = stack
        self.hosts: dict[str, Handler] = {}
        self.scripts: dict[str, list[Handler]] = {}
        self.log: list[httpx.Request] = []

    async def serve(self, url: str, scorer: ScorerDouble, api_keys: tuple[str, ...] = (),
                    limits: Limits | None = None) -> ScorerDouble:
        app = create_app(lambda: scorer, domains=["math"], limits=limits or Limits(batch_wait_ms=1),
                         api_keys=api_keys)
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        await wait_loaded(app)
        self.hosts[url] = transport(app).handle_async_request
        return scorer

    def down(self, url: str) -> None:
        self.hosts[url] = refused

    def script(self, url: str, *handlers: Handler) -> None:
        self.scripts[url] = list(handlers)

    def scored(self, url: str) -> int:
        """/v1/score requests sent to `url` that no script answered."""
        return sum(1 for r in self.log if str(r.url).startswith(url) and r.url.path == "/v1/score")

    def sent_prompts(self, url: str) -> list[list[list[int]]]:
        """Per /v1/score request sent to `url`, its items' indices grouped by prompt."""
        out = []
        for r in self.log:
            if str(r.url).startswith(url) and r.url.path == "/v1/score":
                groups: dict[tuple[int, ...], list[int]] = {}
                for i, it in enumerate(decode_score_request(r.content, r.headers["content-type"]).items):
                    groups.setdefault(tuple(it.input_ids[:it.response_start]), []).append(i)
                out.append(list(groups.values()))
        return out

    async def handle(self, request: httpx.Request) -> httpx.Response:
        url = f"{request.url.scheme}://{request.url.netloc.decode()}"
        scripted = self.scripts.get(url) if request.url.path == "/v1/score" else None
        if scripted:
            handler = scripted.pop(0)
        else:
            self.log.append(request)
            handler = self.hosts.get(url, refused)
        response = handler(request)
        return response if isinstance(response, httpx.Response) else await response


@pytest.fixture
async def net() -> AsyncIterator[Network]:
    async with contextlib.AsyncExitStack() as stack:
        yield Network(stack)


async def router_for(net: Network, pools: dict[str, list[str]], handshake: bool = True, **kw) -> TeacherRouter:
    router = TeacherRouter({d: [Endpoint(u) for u in urls] for d, urls in pools.items()},
                           transport=httpx.MockTransport(net.handle), **{**FAST, **kw})
    if handshake:
        await router.handshake(STUDENT)
    return router


def assert_spans(got: list[np.ndarray | None], scorer: ScorerDouble, items) -> None:
    assert len(got) == len(items)
    for g, it in zip(got, items, strict=True):
        assert g is not None and g.dtype == np.float32
        np.testing.assert_array_equal(g, scorer.span(it.input_ids, it.response_start).logprobs)


def span_len(items) -> int:
    return sum(len(it.input_ids) - it.response_start for it in items)


# ---- routing and cache ---------------------------------------------------------------------------------------------

async def test_each_domain_is_scored_by_its_own_teacher_in_chunks(net):
    math, code = await net.serve(MATH, ScorerDouble(seed=0)), await net.serve(CODE, ScorerDouble(seed=1))
    rng = np.random.default_rng(0)
    math_items, code_items = random_items(rng, 5), random_items(rng, 4)
    requests = [("math", it) for it in math_items[:3]] + [("code", it) for it in code_items] + \
               [("math", it) for it in math_items[3:]]
    router = await router_for(net, {"math": [MATH], "code": [CODE]}, max_items_per_request=2)
    results = await router.score(requests)
    assert_spans(results[:3] + results[7:], math, math_items)
    assert_spans(results[3:7], code, code_items)
    assert not np.allclose(results[0], code.span(math_items[0].input_ids, math_items[0].response_start).logprobs)
    assert (net.scored(MATH), net.scored(CODE)) == (3, 2)  # at most two items a request
    assert sum(len(c) for c in math.calls) == 5 and sum(len(c) for c in code.calls) == 4
    m = router.metrics()
    assert (m[f"endpoint/{MATH}/calls"], m[f"endpoint/{CODE}/calls"]) == (3, 2)
    assert (m["domain/math/scored"], m["domain/code/scored"], m["domain/math/masked"]) == (5, 4, 0)
    assert m[f"endpoint/{MATH}/latency_p99_s"] >= m[f"endpoint/{MATH}/latency_p50_s"] > 0
    assert m["teachers/math/fingerprint"] != m["teachers/code/fingerprint"]
    await router.aclose()


async def test_second_identical_call_is_served_from_the_cache(net):
    math = await net.serve(MATH, ScorerDouble())
    items = random_items(np.random.default_rng(1), 6)
    router = await router_for(net, {"math": [MATH]}, cache=ScoreCache(MEMORY_URL))
    first = await router.score([("math", it) for it in items])
    assert router.metrics(reset=True)["cache/misses"] == 6
    second = await router.score([("math", it) for it in items])
    m = router.metrics()
    assert m["cache/hit_rate"] == 1.0 and m["cache/hits"] == 6 and m["domain/math/cached"] == 6
    assert m[f"endpoint/{MATH}/calls"] == 0 and net.scored(MATH) == 1
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert_spans(second, math, items)
    await router.aclose()


async def test_distributions_are_routed_and_cached_apart_from_plain_spans(net):
    math = await net.serve(MATH, ScorerDouble(seed=2))
    items = random_items(np.random.default_rng(9), 4)
    full = [it.model_copy(update={"distribution": True}) for it in items]
    router = await router_for(net, {"math": [MATH]}, cache=ScoreCache(MEMORY_URL))
    plain = await router.score_spans([("math", it) for it in items])
    first = await router.score_spans([("math", it) for it in full])  # the same tokens: not the plain entries
    assert router.metrics(reset=True)["cache/hits"] == 0 and all(s.distribution is None for s in plain)
    again = await router.score_spans([("math", it) for it in full])
    assert router.metrics()["cache/hits"] == 4 and net.scored(MATH) == 2
    for it, a, b in zip(full, first, again, strict=True):
        want = math.span(it.input_ids, it.response_start, distribution=True)
        for got in (a, b):
            np.testing.assert_array_equal(got.logprobs, want.logprobs)
            np.testing.assert_array_equal(got.distribution, want.distribution)
    await router.aclose()


async def test_candidates_are_routed_and_cached_under_their_own_keys(net):
    """A candidate item's cache entry holds its log-probs, candidates and tails (with a distribution too when asked);
    other candidates, or none, are other keys."""
    math = await net.serve(MATH, ScorerDouble(seed=2))
    items = random_items(np.random.default_rng(12), 3)
    asked = [items[0].model_copy(update={"candidates": [[4, 8, 15, 16]]}),
             items[1].model_copy(update={"candidates": [[23, 42]], "distribution": True}),
             items[2].model_copy(update={"candidates": [[1 + p, 2 + p] for p in range(len(items[2].input_ids)
                                                                                     - items[2].response_start)]})]
    others = [it.model_copy(update={"candidates": [[4, 8, 15]]}) for it in items]
    router = await router_for(net, {"math": [MATH]}, cache=ScoreCache(MEMORY_URL))
    await router.score_spans([("math", it) for it in items + others])
    first = await router.score_spans([("math", it) for it in asked])
    fresh = router.metrics(reset=True)
    assert fresh["cache/hits"] == 0
    # the wire bytes of the step: the 3 items' ids and candidates out, their float32 scores back
    values = sum((len(it.input_ids) - it.response_start) * (1 + 512 * it.distribution + len(it.candidates[0]) + 1)
                 for it in asked)
    assert fresh["teachers/bytes_received"] > 4 * values and fresh["teachers/bytes_sent"] > 0
    again = await router.score_spans([("math", it) for it in asked])
    cached = router.metrics()
    assert cached["cache/hits"] == 3 and net.scored(MATH) == 2
    assert cached["teachers/bytes_sent"] == cached["teachers/bytes_received"] == 0
    for it, a, b in zip(asked, first, again, strict=True):
        want = math.span(it.input_ids, it.response_start, distribution=it.distribution, candidates=it.candidates)
        for got in (a, b):
            np.testing.assert_array_equal(got.logprobs, want.logprobs)
            np.testing.assert_array_equal(got.candidate_logprobs, want.candidate_logprobs)
            np.testing.assert_array_equal(got.tail_logprobs, want.tail_logprobs)
            assert (got.distribution is None) == (not it.distribution)
            if it.distribution:
                np.testing.assert_array_equal(got.distribution, want.distribution)
    await router.aclose()


async def test_a_distribution_of_the_wrong_shape_is_a_failed_call(net):
    await net.serve(MATH, ScorerDouble())
    item = random_items(np.random.default_rng(10), 1)[0].model_copy(update={"distribution": True})
    n = len(item.input_ids) - item.response_start

    def short_rows(request: httpx.Request) -> httpx.Response:
        fingerprint = router.info("math").fingerprint
        span = ScoredSpan(np.zeros(n, np.float32), distribution=np.zeros((n, 7), np.float32))
        return httpx.Response(200, content=encode_score_response(fingerprint, [span], True),
                              headers={"content-type": MSGPACK})

    router = await router_for(net, {"math": [MATH]}, retries=1)
    net.script(MATH, short_rows)
    got = await router.score_spans([("math", item)])
    assert got[0] is not None and got[0].distribution.shape == (n, 512)  # the retry reached the real teacher
    assert router.metrics()[f"endpoint/{MATH}/failures"] == 1
    await router.aclose()


async def test_a_changed_teacher_never_hits_the_old_teachers_entries(net):
    await net.serve(MATH, ScorerDouble(seed=0))
    other = await net.serve(CODE, ScorerDouble(seed=1))
    cache = ScoreCache(MEMORY_URL)  # shared by both runs, as Redis would be
    items = random_items(np.random.default_rng(2), 4)
    old = await router_for(net, {"math": [MATH]}, cache=cache)
    await old.score([("math", it) for it in items])
    new = await router_for(net, {"math": [CODE]}, cache=cache)
    new_scores = await new.score([("math", it) for it in items])
    assert new.metrics()["cache/hits"] == 0 and net.scored(CODE) == 1
    assert_spans(new_scores, other, items)
    await new.aclose()
    await old.aclose()


async def test_one_teacher_serving_two_domains_is_one_endpoint(net):
    math = await net.serve(MATH, ScorerDouble())
    items = random_items(np.random.default_rng(9), 2)
    router = await router_for(net, {"math": [MATH], "algebra": [MATH]})
    assert_spans(await router.score([("math", items[0]), ("algebra", items[1])]), math, items)
    m = router.metrics()
    assert m[f"endpoint/{MATH}/calls"] == 2 and len([k for k in m if k.endswith("/calls")]) == 1
    await router.aclose()


async def test_the_api_key_and_the_timeout_go_with_every_request(net):
    await net.serve(MATH, ScorerDouble(), api_keys=("team-key",))
    router = TeacherRouter({"math": [Endpoint(MATH, api_key="team-key")]}, transport=httpx.MockTransport(net.handle),
                           **{**FAST, "timeout_s": 7.5})
    await router.handshake(STUDENT)
    assert (await router.score([("math", random_items(np.random.default_rng(3), 1)[0])]))[0] is not None
    assert [r.url.path for r in net.log] == ["/v1/info", "/v1/score"]
    assert all(r.headers["authorization"] == "Bearer team-key" for r in net.log)
    assert all(r.extensions["timeout"] == {"connect": 7.5, "read": 7.5, "write": 7.5, "pool": 7.5} for r in net.log)
    assert net.log[1].headers["content-type"] == MSGPACK  # the compact encoding
    await router.aclose()
    wrong = TeacherRouter({"math": [Endpoint(MATH, api_key="nope")]}, transport=httpx.MockTransport(net.handle), **FAST)
    with pytest.raises(TeacherUnavailable, match="invalid API key"):
        await wrong.handshake(STUDENT)
    await wrong.aclose()


# ---- retries, failover, breaker ------------------------------------------------------------------------------------

async def test_failover_to_a_live_replica_then_the_breaker_skips_the_dead_one(net):
    math = await net.serve(MATH, ScorerDouble())
    await net.serve(SPARE, ScorerDouble())  # same model: one fingerprint
    router = await router_for(net, {"math": [SPARE, MATH]}, max_items_per_request=2, breaker_failures=2,
                              breaker_cooldown_s=3600)
    net.down(SPARE)
    items = random_items(np.random.default_rng(3), 8)
    assert_spans(await router.score([("math", it) for it in items]), math, items)
    m = router.metrics(reset=True)
    assert m[f"endpoint/{SPARE}/failures"] == 2 and m[f"endpoint/{MATH}/retries"] == 2  # chunks 0 and 2 started there
    assert m["domain/math/masked"] == 0 and m[f"endpoint/{SPARE}/breaker_open"] == 1.0
    for seed in (4, 5):
        more = random_items(np.random.default_rng(seed), 8)
        assert_spans(await router.score([("math", it) for it in more]), math, more)
    m = router.metrics()
    assert m[f"endpoint/{SPARE}/calls"] == 0 and m[f"endpoint/{SPARE}/breaker_skips"] == 4
    assert m[f"endpoint/{MATH}/calls"] == 8 and m[f"endpoint/{MATH}/retries"] == 0
    await router.aclose()


async def test_all_replicas_dead_masks_the_domain_and_still_returns(net):
    await net.serve(SPARE, ScorerDouble())
    await net.serve(CODE, ScorerDouble(seed=1))
    router = await router_for(net, {"math": [SPARE], "code": [CODE]}, retries=2)
    net.down(SPARE)
    rng = np.random.default_rng(6)
    results = await router.score([("math", it) for it in random_items(rng, 3)] +
                                 [("code", it) for it in random_items(rng, 2)])
    assert results[:3] == [None, None, None] and all(r is not None for r in results[3:])
    m = router.metrics()
    assert (m["domain/math/masked"], m["domain/math/scored"], m["domain/code/scored"]) == (3, 0, 2)
    assert m[f"endpoint/{SPARE}/calls"] == m[f"endpoint/{SPARE}/failures"] == 3  # one try and two retries
    await router.aclose()


async def test_a_teacher_restarting_longer_than_the_retries_is_waited_for_within_the_retry_budget(net, caplog):
    """One retry alone masks the samples within milliseconds; the budget keeps retrying (through the breaker's
    cooldowns) until the teacher is back, one log line a retry."""
    math = await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, retries=1, backoff_s=0.01, backoff_cap_s=0.05,
                              retry_budget_s=30, breaker_cooldown_s=0.05)
    net.hosts[MATH] = refused_until(time.monotonic() + 0.3, net.hosts[MATH])
    items = random_items(np.random.default_rng(14), 3)
    with caplog.at_level(logging.WARNING, logger="trainer.teacher_router"):
        assert_spans(await router.score([("math", it) for it in items]), math, items)
    lines = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(lines) >= 3 and router.metrics()["domain/math/masked"] == 0
    assert all(re.fullmatch(rf"domain 'math': 3 items failed \(attempt {i}, its teachers failing for \d+\.\d s\): "
                            rf"({MATH}: ConnectError.*|every replica's circuit breaker is open); retrying in "
                            r"\d+\.\d s", line) for i, line in enumerate(lines, 1)), lines
    await router.aclose()


async def test_a_teacher_down_for_good_costs_the_retry_budget_once_per_outage(net, caplog):
    """The budget counts from the pool's first failure: the next step's chunks get `retries` alone, and a teacher
    that came back and went down again gets the whole budget again."""
    await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, retries=2, backoff_s=0.01, backoff_cap_s=0.02,
                              retry_budget_s=0.3, breaker_failures=1000)
    item = random_items(np.random.default_rng(15), 1)[0]
    calls = []
    for back in (False, False, True, False):
        if back:
            await net.serve(MATH, ScorerDouble())
        else:
            net.down(MATH)
        with caplog.at_level(logging.WARNING, logger="trainer.teacher_router"):
            (got,) = await router.score([("math", item)])
        assert (got is None) is not back
        calls.append(router.metrics(reset=True)[f"endpoint/{MATH}/calls"])
    assert calls[0] > 3 and calls[1:3] == [3, 1] and calls[3] > 3
    assert re.fullmatch(rf"domain 'math': 1 items not scored after {calls[0]} attempts, its teachers failing for "
                        rf"\d+\.\d s \(retry budget 0\.3 s; last: {MATH}: ConnectError.*\)",
                        next(r.getMessage() for r in caplog.records if "not scored" in r.getMessage()))
    await router.aclose()


def undecodable(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, content=b"\xc1 not msgpack", headers={"content-type": MSGPACK})


def timed_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("read timed out", request=request)


def dropped(request: httpx.Request) -> httpx.Response:
    raise httpx.RemoteProtocolError("peer closed connection", request=request)


@pytest.mark.parametrize("failure", [refused, timed_out, dropped, undecodable, api_error(503, "not_ready"),
                                     api_error(500, "internal")], ids=lambda f: getattr(f, "__name__", "status"))
async def test_a_transient_failure_is_retried_and_counted(net, failure):
    math = await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, breaker_failures=3)
    net.script(MATH, failure, failure)
    items = random_items(np.random.default_rng(7), 3)
    assert_spans(await router.score([("math", it) for it in items]), math, items)
    m = router.metrics()
    assert (m[f"endpoint/{MATH}/calls"], m[f"endpoint/{MATH}/failures"], m[f"endpoint/{MATH}/retries"]) == (3, 2, 2)
    assert m[f"endpoint/{MATH}/breaker_open"] == 0.0 and m["domain/math/masked"] == 0
    await router.aclose()


async def test_a_response_with_the_wrong_span_lengths_is_a_failure(net, caplog):
    math = await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]})
    fingerprint = router.info("math").fingerprint

    def short(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=encode_score_response(fingerprint, [ScoredSpan(np.zeros(1, np.float32))],
                                                                 binary=True), headers={"content-type": MSGPACK})

    net.script(MATH, short)
    items = random_items(np.random.default_rng(8), 1, lo=8, hi=20)
    with caplog.at_level(logging.ERROR, logger="trainer.teacher_router"):
        assert_spans(await router.score([("math", it) for it in items]), math, items)
    assert router.metrics()[f"endpoint/{MATH}/failures"] == 1
    assert any("span lengths do not match" in r.getMessage() for r in caplog.records)
    await router.aclose()


async def test_a_429_waits_its_retry_after_up_to_the_backoff_cap(net):
    math = await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, backoff_cap_s=0.3)
    net.script(MATH, api_error(429, "quota_exceeded", {"Retry-After": "30"}, "tokens_per_minute"))
    items = random_items(np.random.default_rng(10), 2)
    start = time.monotonic()
    assert_spans(await router.score([("math", it) for it in items]), math, items)
    waited = time.monotonic() - start
    assert 0.3 <= waited < 10, waited  # min(Retry-After, cap): backoff_s is 0, so only the 429 made it wait
    m = router.metrics()
    assert (m[f"endpoint/{MATH}/failures"], m[f"endpoint/{MATH}/retries"]) == (1, 1)
    await router.aclose()


async def test_a_rejected_request_is_masked_without_retry_and_keeps_the_breaker_closed(net, caplog):
    math = await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, breaker_failures=1, max_items_per_request=1)
    net.script(MATH, api_error(422, "too_long", field="items[0].input_ids"))
    items = random_items(np.random.default_rng(11), 2)
    with caplog.at_level(logging.ERROR, logger="trainer.teacher_router"):
        results = await router.score([("math", it) for it in items])
    assert sum(r is None for r in results) == 1  # the chunk the teacher refused; the other was scored
    scored = next(i for i, r in enumerate(results) if r is not None)
    assert_spans([results[scored]], math, [items[scored]])
    m = router.metrics()
    assert (m[f"endpoint/{MATH}/calls"], m[f"endpoint/{MATH}/failures"], m[f"endpoint/{MATH}/retries"]) == (2, 0, 0)
    assert m[f"endpoint/{MATH}/breaker_open"] == 0.0 and m["domain/math/masked"] == 1
    assert any("items[0].input_ids" in r.getMessage() and "masking 1 samples" in r.getMessage()
               for r in caplog.records)
    await router.aclose()


async def test_the_breaker_half_opens_after_its_cooldown_and_one_good_trial_closes_it(net):
    math = await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, breaker_failures=1, breaker_cooldown_s=1.0, retries=3)
    item = random_items(np.random.default_rng(12), 1)[0]
    net.script(MATH, refused)
    assert await router.score([("math", item)]) == [None]
    m = router.metrics(reset=True)
    assert m[f"endpoint/{MATH}/breaker_open"] == 1.0 and m[f"endpoint/{MATH}/breaker_skips"] == 3
    assert (m[f"endpoint/{MATH}/calls"], m[f"endpoint/{MATH}/failures"]) == (1, 1)
    assert await router.score([("math", item)]) == [None]  # the teacher is back, but the cooldown has not passed
    assert net.scored(MATH) == 0
    await asyncio.sleep(1.05)
    assert_spans(await router.score([("math", item)]), math, [item])
    m = router.metrics()
    assert m[f"endpoint/{MATH}/breaker_open"] == 0.0 and m[f"endpoint/{MATH}/calls"] == 1
    await router.aclose()


async def test_a_teacher_redeployed_with_another_fingerprint_is_a_failure_and_nothing_is_cached(net, caplog):
    math = await net.serve(MATH, ScorerDouble(seed=0))
    cache = ScoreCache(MEMORY_URL)
    router = await router_for(net, {"math": [MATH]}, cache=cache, retries=1)
    await net.serve(MATH, ScorerDouble(seed=1))  # the same URL now serves another teacher
    items = random_items(np.random.default_rng(13), 2)
    with caplog.at_level(logging.ERROR, logger="trainer.teacher_router"):
        assert await router.score([("math", it) for it in items]) == [None, None]
    assert router.metrics(reset=True)[f"endpoint/{MATH}/failures"] == 2
    assert any("fingerprint changed" in r.getMessage() for r in caplog.records)
    await net.serve(MATH, math)  # the original teacher back: nothing of the other one's was cached
    assert_spans(await router.score([("math", it) for it in items]), math, items)
    assert router.metrics()["cache/hits"] == 0
    await router.aclose()


# ---- handshake -----------------------------------------------------------------------------------------------------

async def test_handshake_refuses_a_tokenizer_mismatch_unless_allowed(net, caplog):
    await net.serve(MATH, ScorerDouble(tokenizer="tok-foreign"))
    router = await router_for(net, {"math": [MATH]}, handshake=False)
    with pytest.raises(TokenizerMismatch) as err:
        await router.handshake(STUDENT)
    assert "'math'" in str(err.value) and STUDENT in str(err.value) and "tok-foreign" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="trainer.teacher_router"):
        infos = await router.handshake(STUDENT, allow_tokenizer_mismatch=True)
    assert infos["math"].tokenizer_fingerprint == "tok-foreign"
    warnings = [r for r in caplog.records if "TOKENIZER MISMATCH" in r.getMessage()]
    assert len(warnings) == 1 and "'math'" in warnings[0].getMessage()
    await router.aclose()


async def test_handshake_refuses_replicas_with_different_fingerprints(net):
    await net.serve(MATH, ScorerDouble(seed=0))
    await net.serve(CODE, ScorerDouble(seed=1))
    router = await router_for(net, {"math": [MATH, CODE]}, handshake=False)
    with pytest.raises(FingerprintMismatch) as err:
        await router.handshake(STUDENT)
    assert "'math'" in str(err.value) and MATH in str(err.value) and CODE in str(err.value)
    await router.aclose()


async def test_handshake_refuses_an_unreachable_endpoint(net):
    await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH, SPARE]}, handshake=False)
    with pytest.raises(TeacherUnavailable, match=re.escape(SPARE)):
        await router.handshake(STUDENT)
    await router.aclose()


async def test_handshake_checks_the_expected_fingerprint_prefix(net):
    await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, handshake=False)
    digest = (await router.handshake(STUDENT))["math"].fingerprint.digest
    assert (await router.handshake(STUDENT, expected={"math": digest[:12]}))["math"].fingerprint.digest == digest
    wrong = "0" * 12 if not digest.startswith("0" * 12) else "1" * 12
    with pytest.raises(FingerprintMismatch, match=wrong):
        await router.handshake(STUDENT, expected={"math": wrong})
    await router.aclose()


async def test_score_refuses_unknown_domains_top_k_and_an_unhandshaken_router(net):
    await net.serve(MATH, ScorerDouble())
    router = await router_for(net, {"math": [MATH]}, handshake=False)
    item = random_items(np.random.default_rng(14), 1)[0]
    with pytest.raises(RuntimeError, match="handshake"):
        await router.score([("math", item)])
    await router.handshake(STUDENT)
    with pytest.raises(ValueError, match="'chemistry'"):
        await router.score([("chemistry", item)])
    with pytest.raises(ValueError, match="top_k"):
        await router.score([("math", item.model_copy(update={"top_k": 2}))])
    assert await router.score([]) == [] and net.scored(MATH) == 0
    await router.aclose()


async def test_a_prompts_samples_go_to_one_request_when_they_fit(net):
    """Affinity by prompt: the teacher computes a shared prompt once only if its samples arrive together."""
    math = await net.serve(MATH, ScorerDouble(seed=0))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 512, size=6).tolist() for _ in range(3)]

    def sample(p: int) -> ScoreItem:
        return ScoreItem(input_ids=prompts[p] + rng.integers(0, 512, size=4).tolist(), response_start=6)

    items = [sample(p) for _ in range(3) for p in range(3)]  # interleaved: p0 p1 p2 p0 p1 p2 ...
    router = await router_for(net, {"math": [MATH]}, max_items_per_request=4)
    assert_spans(await router.score([("math", it) for it in items]), math, items)
    assert [[len(p) for p in sent] for sent in net.sent_prompts(MATH)] == [[3], [3], [3]]  # not 4 + 4 + 1
    wide = [sample(0) for _ in range(6)]  # more samples than a request holds: split, the first request full
    await router.score([("math", it) for it in wide])
    assert [[len(p) for p in sent] for sent in net.sent_prompts(MATH)[3:]] == [[4], [2]]
    await router.aclose()


async def test_requests_stay_within_the_teachers_distribution_values(net):
    """A teacher publishes max_distribution_values; the router cuts distribution requests to it (a request over it
    would be refused whole with a 413 and its samples masked), keeping a prompt's samples together where they fit."""
    limit = 3 * 10 * 512  # three distribution items of 10 response positions
    math = await net.serve(MATH, ScorerDouble(seed=0), limits=Limits(batch_wait_ms=1, max_distribution_values=limit))
    rng = np.random.default_rng(6)
    prompts = [rng.integers(0, 512, size=6).tolist() for _ in range(2)]
    items = [ScoreItem(input_ids=prompts[p] + rng.integers(0, 512, size=10).tolist(), response_start=6,
                       distribution=True) for p in (0, 0, 1, 1, 0, 1)]
    router = await router_for(net, {"math": [MATH]})
    spans = await router.score_spans([("math", it) for it in items])
    assert all(s is not None and s.distribution.shape == (10, 512) for s in spans)
    assert_spans([s.logprobs for s in spans], math, items)
    assert router.metrics()["domain/math/masked"] == 0
    assert [[len(p) for p in sent] for sent in net.sent_prompts(MATH)] == [[3], [3]]  # not 3 + 3 cut at 3 items
    await router.aclose()

async def test_float16_responses_arrive_within_their_rounding_at_half_the_bytes(net):
    """teacher_client.float_dtype: float16 reaches the teacher app, which answers in float16."""
    math = await net.serve(MATH, ScorerDouble(seed=0))
    items = random_items(np.random.default_rng(5), 8)
    received = {}
    for dtype in ("float32", "float16"):
        router = await router_for(net, {"math": [MATH]}, float_dtype=dtype)
        got = await router.score([("math", it) for it in items])
        received[dtype] = router.metrics()["teachers/bytes_received"]
        for g, it in zip(got, items, strict=True):
            want = math.span(it.input_ids, it.response_start).logprobs
            np.testing.assert_allclose(g, want, rtol=2**-11 if dtype == "float16" else 0)
        await router.aclose()
    floats = span_len(items)
    assert received["float32"] - received["float16"] >= 2 * floats - 32
