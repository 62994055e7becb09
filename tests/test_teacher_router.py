"""TeacherRouter against real teacher processes and a real redis-server: routing, cache, failover, handshake."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from proto.client import TeacherClient
from proto.fingerprint import tokenizer_fingerprint
from trainer.retry import backoff_delay
from trainer.score_cache import ScoreCache
from trainer.teacher_router import (
    CircuitBreaker,
    Endpoint,
    FingerprintMismatch,
    TeacherRouter,
    TeacherUnavailable,
    TokenizerMismatch,
)
from uniopd.launch import ServerProcess, free_port, spawn_server, start_teacher
from uniopd.tiny_models import build_tiny_model

from .conftest import random_items

FAST = dict(timeout_s=10.0, backoff_s=0.01)


# --- pure pieces -----------------------------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_cap():
    assert backoff_delay(3, 0.5, 10.0, 0.0) == 0.0
    assert [backoff_delay(a, 0.5, 10.0, 0.5) for a in range(6)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0]
    assert backoff_delay(50, 0.5, 10.0, 0.999) < 10.0


def test_breaker_opens_half_opens_and_closes():
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cooldown_s=10.0, clock=lambda: now[0])
    assert [breaker.record_failure() for _ in range(3)] == [False, False, True]
    assert breaker.is_open and not breaker.allow()
    now[0] = 10.0
    assert breaker.allow() and not breaker.allow()  # half-open: exactly one trial call
    assert breaker.record_failure() and not breaker.allow()  # failed trial re-opens for a full cooldown
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow() and breaker.allow()
    breaker.record_failure()
    breaker.record_success()
    assert [breaker.record_failure() for _ in range(3)] == [False, False, True]  # success resets the count


def test_abandoned_trial_frees_the_slot():
    now = [0.0]
    breaker = CircuitBreaker(failures=1, cooldown_s=1.0, clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 1.0
    assert breaker.allow()
    breaker.abandon()
    assert breaker.is_open and breaker.allow()


# --- real teachers ---------------------------------------------------------------------------------------------------


def start_many(specs: list[tuple[Path, list[str]]], log_dir: Path) -> list[ServerProcess]:
    """Start teacher processes concurrently (start-up is mostly imports)."""
    with ThreadPoolExecutor(len(specs)) as pool:
        return list(pool.map(lambda spec: start_teacher(spec[0], "hf", spec[1], log_dir=log_dir), specs))


def serve_on_port(model_dir: Path, port: int, log_dir: Path) -> ServerProcess:
    """A teacher on a given port: a redeploy behind an unchanged URL."""
    log_path = log_dir / f"redeploy-{port}.log"
    cmd = [sys.executable, "-m", "uniopd", "teacher", "serve", "--model", str(model_dir), "--backend", "hf",
           "--host", "127.0.0.1", "--port", str(port), "--domain", "math"]
    return spawn_server(cmd, port, log_path, "redeployed teacher", timeout=120)


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("router-logs")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    """Same tokenizer, other weights: another teacher fingerprint."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-seed1", "qwen3", seed=1)


@pytest.fixture(scope="module")
def teachers(tiny_model, other_model, log_dir):
    math, code = start_many([(tiny_model, ["--domain", "math"]), (other_model, ["--domain", "code"])], log_dir)
    yield {"math": math, "code": code}
    math.stop()
    code.stop()


@pytest.fixture
def spare(tiny_model, log_dir):
    """A replica of the math teacher that a test may kill."""
    server = start_teacher(tiny_model, "hf", ["--domain", "math"], log_dir=log_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def student_fp(tiny_model) -> str:
    from transformers import AutoTokenizer

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))


def scored_tokens(server: ServerProcess) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(re.search(r"^uniopd_scored_tokens_total (\S+)$", text, re.M).group(1))


def span_len(items) -> int:
    return sum(len(it.input_ids) - it.response_start for it in items)


async def direct(server: ServerProcess, items) -> list[np.ndarray]:
    async with TeacherClient(server.url) as client:
        return [s.logprobs for s in (await client.score(items))[1]]


def assert_scores_close(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g is not None and g.dtype == np.float32
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


async def ready_router(pools, student_fp, **kwargs) -> TeacherRouter:
    router = TeacherRouter({d: [Endpoint(s.url) for s in servers] for d, servers in pools.items()}, **kwargs)
    await router.handshake(student_fp)
    return router


@pytest.mark.e2e
async def test_each_domain_is_scored_by_its_own_teacher(teachers, student_fp):
    rng = np.random.default_rng(0)
    math_items, code_items = random_items(rng, 5), random_items(rng, 4)
    requests = [("math", it) for it in math_items[:3]] + [("code", it) for it in code_items] + \
               [("math", it) for it in math_items[3:]]
    before = {d: scored_tokens(s) for d, s in teachers.items()}
    pools = {d: [s] for d, s in teachers.items()}
    router = await ready_router(pools, student_fp, max_items_per_request=2, **FAST)
    results = await router.score(requests)

    assert scored_tokens(teachers["math"]) - before["math"] == span_len(math_items)
    assert scored_tokens(teachers["code"]) - before["code"] == span_len(code_items)
    got_math, got_code = results[:3] + results[7:], results[3:7]
    assert_scores_close(got_math, await direct(teachers["math"], math_items))
    assert_scores_close(got_code, await direct(teachers["code"], code_items))
    assert not np.allclose(got_math[0], (await direct(teachers["code"], math_items[:1]))[0], atol=1e-3)
    m = router.metrics()
    assert m[f"endpoint/{teachers['math'].url}/calls"] == 3 and m[f"endpoint/{teachers['code'].url}/calls"] == 2
    assert (m["domain/math/scored"], m["domain/code/scored"], m["domain/math/masked"]) == (5, 4, 0)
    assert m[f"endpoint/{teachers['math'].url}/latency_p99_s"] >= m[f"endpoint/{teachers['math'].url}/latency_p50_s"]
    await router.aclose()


@pytest.mark.e2e
async def test_second_identical_call_is_served_from_cache(teachers, student_fp, redis_server):
    items = random_items(np.random.default_rng(1), 6)
    router = await ready_router({"math": [teachers["math"]]}, student_fp, cache=ScoreCache(redis_server.url), **FAST)
    first = await router.score([("math", it) for it in items])
    assert router.metrics(reset=True)["cache/misses"] == 6
    before = scored_tokens(teachers["math"])
    second = await router.score([("math", it) for it in items])
    assert scored_tokens(teachers["math"]) == before
    m = router.metrics()
    assert m["cache/hit_rate"] == 1.0 and m["cache/hits"] == 6 and m["domain/math/cached"] == 6
    assert m[f"endpoint/{teachers['math'].url}/calls"] == 0
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    await router.aclose()


@pytest.mark.e2e
async def test_changed_teacher_never_hits_the_old_teachers_entries(teachers, student_fp, redis_server):
    items = random_items(np.random.default_rng(2), 4)
    requests = [("math", it) for it in items]
    old = await ready_router({"math": [teachers["math"]]}, student_fp, cache=ScoreCache(redis_server.url), **FAST)
    old_scores = await old.score(requests)
    await old.aclose()

    before = scored_tokens(teachers["code"])
    new = await ready_router({"math": [teachers["code"]]}, student_fp, cache=ScoreCache(redis_server.url), **FAST)
    new_scores = await new.score(requests)
    assert new.metrics()["cache/hits"] == 0
    assert scored_tokens(teachers["code"]) - before == span_len(items)
    assert not any(np.allclose(a, b, atol=1e-3) for a, b in zip(old_scores, new_scores, strict=True))
    await new.aclose()


@pytest.mark.e2e
async def test_failover_to_live_replica_then_breaker_skips_the_dead_one(teachers, spare, student_fp):
    live = teachers["math"]
    router = await ready_router({"math": [live, spare]}, student_fp, max_items_per_request=2, breaker_failures=2,
                                breaker_cooldown_s=3600, **FAST)
    spare.stop()
    items = random_items(np.random.default_rng(3), 8)
    results = await router.score([("math", it) for it in items])
    assert_scores_close(results, await direct(live, items))
    m = router.metrics(reset=True)
    assert m[f"endpoint/{spare.url}/failures"] >= 1 and m[f"endpoint/{live.url}/retries"] >= 1
    assert m["domain/math/masked"] == 0 and m[f"endpoint/{spare.url}/breaker_open"] == 1.0

    for seed in (4, 5):
        more = random_items(np.random.default_rng(seed), 8)
        assert all(r is not None for r in await router.score([("math", it) for it in more]))
    m = router.metrics()
    assert m[f"endpoint/{spare.url}/calls"] == 0 and m[f"endpoint/{spare.url}/breaker_skips"] >= 4
    assert m[f"endpoint/{live.url}/calls"] == 8 and m[f"endpoint/{live.url}/retries"] == 0
    await router.aclose()


@pytest.mark.e2e
async def test_all_replicas_dead_masks_the_domain_and_still_returns(teachers, spare, student_fp):
    router = await ready_router({"math": [spare], "code": [teachers["code"]]}, student_fp, retries=2, **FAST)
    spare.stop()
    rng = np.random.default_rng(6)
    results = await router.score([("math", it) for it in random_items(rng, 3)] +
                                 [("code", it) for it in random_items(rng, 2)])
    assert results[:3] == [None, None, None] and all(r is not None for r in results[3:])
    m = router.metrics()
    assert (m["domain/math/masked"], m["domain/math/scored"], m["domain/code/scored"]) == (3, 0, 2)
    assert m[f"endpoint/{spare.url}/calls"] == m[f"endpoint/{spare.url}/failures"] == 3
    await router.aclose()


@pytest.mark.e2e
async def test_redeployed_teacher_with_other_fingerprint_is_a_failure_and_not_cached(
        spare, other_model, student_fp, redis_server, log_dir, caplog):
    router = await ready_router({"math": [spare]}, student_fp, cache=ScoreCache(redis_server.url), retries=1, **FAST)
    spare.stop()
    port = int(spare.url.rsplit(":", 1)[1])
    with serve_on_port(other_model, port, log_dir), caplog.at_level(logging.ERROR, logger="trainer.teacher_router"):
        results = await router.score([("math", it) for it in random_items(np.random.default_rng(7), 2)])
    assert results == [None, None]
    assert router.metrics()[f"endpoint/{spare.url}/failures"] == 2
    assert any("fingerprint changed" in r.getMessage() for r in caplog.records)
    with redis_server.client() as c:
        assert c.dbsize() == 0
    await router.aclose()


# --- handshake -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def foreign_tokenizer_teacher(tiny_model, tmp_path_factory, log_dir):
    """The tiny model with another chat template: same weights and vocab, a different tokenizer fingerprint."""
    model = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("models") / "tiny-qwen3-template"))
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (model / "chat_template.jinja").write_text(template)
    server = start_teacher(model, "hf", ["--domain", "math"], log_dir=log_dir)
    yield server
    server.stop()


@pytest.mark.e2e
async def test_handshake_refuses_a_tokenizer_mismatch_unless_allowed(foreign_tokenizer_teacher, student_fp, caplog):
    router = TeacherRouter({"math": [Endpoint(foreign_tokenizer_teacher.url)]}, **FAST)
    with pytest.raises(TokenizerMismatch) as err:
        await router.handshake(student_fp)
    assert "'math'" in str(err.value) and student_fp in str(err.value)
    with caplog.at_level(logging.WARNING, logger="trainer.teacher_router"):
        infos = await router.handshake(student_fp, allow_tokenizer_mismatch=True)
    assert infos["math"].tokenizer_fingerprint in str(err.value)
    assert infos["math"].tokenizer_fingerprint != student_fp
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "TOKENIZER MISMATCH" in r.getMessage()]
    assert len(warnings) == 1 and "'math'" in warnings[0].getMessage()
    await router.aclose()


@pytest.mark.e2e
async def test_handshake_refuses_replicas_with_different_fingerprints(teachers, student_fp):
    router = TeacherRouter({"math": [Endpoint(teachers["math"].url), Endpoint(teachers["code"].url)]}, **FAST)
    with pytest.raises(FingerprintMismatch) as err:
        await router.handshake(student_fp)
    assert "'math'" in str(err.value)
    assert teachers["math"].url in str(err.value) and teachers["code"].url in str(err.value)
    await router.aclose()


@pytest.mark.e2e
async def test_handshake_refuses_an_unreachable_endpoint(teachers, student_fp):
    dead = f"http://127.0.0.1:{free_port()}"
    router = TeacherRouter({"math": [Endpoint(teachers["math"].url), Endpoint(dead)]}, **FAST)
    with pytest.raises(TeacherUnavailable, match=re.escape(dead)):
        await router.handshake(student_fp)
    await router.aclose()


@pytest.mark.e2e
async def test_score_refuses_unknown_domain_and_unhandshaken_router(teachers, student_fp):
    router = TeacherRouter({"math": [Endpoint(teachers["math"].url)]}, **FAST)
    item = random_items(np.random.default_rng(8), 1)[0]
    with pytest.raises(RuntimeError, match="handshake"):
        await router.score([("math", item)])
    await router.handshake(student_fp)
    with pytest.raises(ValueError, match="'chemistry'"):
        await router.score([("chemistry", item)])
    assert await router.score([]) == []
    await router.aclose()


@pytest.mark.e2e
async def test_one_teacher_serving_two_domains_is_one_endpoint(teachers, student_fp):
    math = teachers["math"]
    router = await ready_router({"math": [math], "algebra": [math]}, student_fp, **FAST)
    items = random_items(np.random.default_rng(9), 2)
    results = await router.score([("math", items[0]), ("algebra", items[1])])
    assert_scores_close(results, await direct(math, items))
    m = router.metrics()
    assert m[f"endpoint/{math.url}/calls"] == 2 and len([k for k in m if k.endswith("/calls")]) == 1
    await router.aclose()
