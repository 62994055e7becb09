"""A score cache shared by teams (issue 34, item 1): no team decides which scores another team's runs read.

Teachers are the real teacher app over ScorerDouble, in-process (the router's MockTransport, as in
test_teacher_router_mock.py); the cache is a real redis-server of the test's own, with deploy/redis/users.acl where
Redis users matter."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from proto.schemas import TeacherInfo
from tests.conftest import random_items
from tests.doubles import ScorerDouble
from tests.test_teacher_router_mock import CODE, MATH, Network, assert_spans, router_for
from trainer.config import CacheConfig
from trainer.config_fields import validation_message
from trainer.score_cache import ScoreCache, default_namespace, key_part
from trainer.teacher_router import FingerprintMismatch
from uniopd.launch import RedisServer

ACL = Path(__file__).resolve().parents[1] / "deploy" / "redis" / "users.acl"
ADMIN = ("admin", "change-me-admin")


class LyingScorer(ScorerDouble):
    """Serves one teacher's scores while reporting another's identity (what an endpoint can claim about itself)."""

    def __init__(self, scores_of: int, claims: int) -> None:
        super().__init__(seed=scores_of)
        self._info = ScorerDouble(seed=claims).info()


@pytest.fixture
async def net():
    async with contextlib.AsyncExitStack() as stack:
        yield Network(stack)


@pytest.fixture
def acl_redis():
    server = RedisServer(aclfile=ACL, admin=ADMIN).start()
    yield server
    server.stop()


def answer_info(info: TeacherInfo):
    """An endpoint that answers /v1/info with `info` (whatever it claims)."""
    body = info.model_dump_json()
    return lambda request: httpx.Response(200, content=body, headers={"content-type": "application/json"})


def team_url(server: RedisServer, user: str) -> str:
    return f"redis://{user}:change-me-{user}@127.0.0.1:{server.port}/0"


@pytest.mark.e2e
async def test_float16_answers_are_never_served_to_a_float32_run(net, redis_server):
    """Team A asks for float16 answers and fills the cache; team B's float32 run, same namespace, reads none of them."""
    math = await net.serve(MATH, ScorerDouble(seed=3))
    items = random_items(np.random.default_rng(4), 6)
    half = await router_for(net, {"math": [MATH]}, cache=ScoreCache(redis_server.url), float_dtype="float16")
    rounded = await half.score([("math", it) for it in items])
    full = await router_for(net, {"math": [MATH]}, cache=ScoreCache(redis_server.url))
    exact = await full.score([("math", it) for it in items])
    assert full.metrics()["cache/hits"] == 0
    assert_spans(exact, math, items)
    assert any(not np.array_equal(r, e) for r, e in zip(rounded, exact, strict=True))  # float16 did round them
    again = await half.score([("math", it) for it in items])  # each kind still hits its own entries
    assert half.metrics()["cache/hits"] == 6 and all(np.array_equal(a, r) for a, r in zip(again, rounded,
                                                                                           strict=True))
    await half.aclose()
    await full.aclose()


@pytest.mark.e2e
async def test_a_team_never_reads_scores_written_in_another_namespace(net, redis_server):
    """Team A's endpoint serves the code teacher while reporting the math teacher's fingerprint and fills team A's
    namespace; team B's math domain, on the real math teacher, reads none of it."""
    await net.serve(CODE, LyingScorer(scores_of=1, claims=0))
    math = await net.serve(MATH, ScorerDouble(seed=0))
    items = random_items(np.random.default_rng(5), 5)
    alpha = await router_for(net, {"math": [CODE]}, cache=ScoreCache(redis_server.url, namespace="alpha"))
    beta = await router_for(net, {"math": [MATH]}, cache=ScoreCache(redis_server.url, namespace="beta"))
    assert alpha.info("math").fingerprint.digest == beta.info("math").fingerprint.digest  # the lie holds
    await alpha.score([("math", it) for it in items])
    got = await beta.score([("math", it) for it in items])
    assert beta.metrics()["cache/hits"] == 0 and net.scored(MATH) == 1
    assert_spans(got, math, items)
    with redis_server.client() as c:
        assert {k.decode().rsplit(":", 1)[0] for k in c.keys("*")} == {"uniopd:score:v2:alpha",
                                                                       "uniopd:score:v2:beta"}
    await alpha.aclose()
    await beta.aclose()


@pytest.mark.e2e
async def test_the_redis_acl_keeps_each_team_in_its_own_namespace(net, acl_redis, caplog):
    """With deploy/redis/users.acl, a team that names another team's namespace can neither write nor read it: the
    writes are refused by Redis (logged as a permission error, the run scores on uncached) and the other team's
    entries stay what its own teacher produced."""
    math = await net.serve(MATH, ScorerDouble(seed=0))
    await net.serve(CODE, LyingScorer(scores_of=1, claims=0))
    items = random_items(np.random.default_rng(6), 4)
    beta_cache = ScoreCache(team_url(acl_redis, "beta"))
    assert beta_cache.namespace == "beta"  # from the Redis user
    beta = await router_for(net, {"math": [MATH]}, cache=beta_cache)
    first = await beta.score([("math", it) for it in items])
    intruder = await router_for(net, {"math": [CODE]},
                                cache=ScoreCache(team_url(acl_redis, "alpha"), namespace="beta"))
    with caplog.at_level(logging.ERROR, logger="trainer.score_cache"):
        await intruder.score([("math", it) for it in items])
    assert intruder.metrics()["cache/hits"] == 0 and intruder.cache.errors >= 1
    assert "may not use namespace 'beta'" in caplog.text
    again = await beta.score([("math", it) for it in items])
    assert beta.metrics()["cache/hits"] == 4
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert_spans(again, math, items)
    with acl_redis.client() as c:
        assert all(k.startswith(b"uniopd:score:v2:beta:") for k in c.keys("*")) and len(c.keys("*")) == 4
    await intruder.aclose()
    await beta.aclose()


@pytest.mark.e2e
async def test_the_acl_user_cannot_touch_anything_outside_its_namespace(acl_redis):
    import redis

    with redis.Redis(port=acl_redis.port, username="alpha", password="change-me-alpha") as alpha:
        alpha.set("uniopd:score:v2:alpha:k", b"\0" * 4)
        for forbidden in (lambda: alpha.set("uniopd:score:v2:beta:k", b"\0" * 4),
                          lambda: alpha.get("uniopd:score:v2:beta:k"), lambda: alpha.keys("*"),
                          lambda: alpha.flushall(), lambda: alpha.delete("uniopd:score:v2:alpha:k")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=acl_redis.port).ping()  # the default user is off: no one writes without a team


async def test_a_fingerprint_whose_digest_does_not_cover_its_fields_is_refused(net):
    """The key trusts the digest, so the digest must be the hash of the dtype and backend the teacher reports."""
    await net.serve(MATH, ScorerDouble())
    honest = (await router_for(net, {"math": [MATH]})).info("math")
    for change in ({"dtype": "float16"}, {"backend": "vllm"}, {"scoring_mode": "other"}):
        fingerprint = honest.fingerprint.model_copy(update=change)
        lie = honest.model_copy(update={"fingerprint": fingerprint, **{k: v for k, v in change.items()
                                                                        if k in ("dtype", "backend")}})
        net.hosts[CODE] = answer_info(lie)
        with pytest.raises(FingerprintMismatch, match="not the digest of the fields"):
            await router_for(net, {"math": [CODE]})
    mismatched = honest.model_copy(update={"dtype": "bfloat16"})  # fields of /v1/info disagree with the fingerprint
    net.hosts[CODE] = answer_info(mismatched)
    with pytest.raises(FingerprintMismatch):
        await router_for(net, {"math": [CODE]})
    assert TeacherInfo.model_validate_json(honest.model_dump_json()) == honest


def test_namespace_defaults_to_the_redis_user_and_is_validated():
    assert default_namespace("redis://alpha:pw@host:6379/0") == "alpha"
    assert default_namespace("redis://al%2Dpha@host/0") == "al-pha"
    assert default_namespace("redis://:pw@host/0") == default_namespace("redis://host/0") == "default"
    assert default_namespace("redis://default:pw@host/0") == default_namespace("memory://") == "default"
    with pytest.raises(ValueError, match=r"set cache\.namespace"):
        default_namespace("redis://a%3Ab@host/0")  # never a prefix escape
    assert ScoreCache(None, namespace="team.a-1").prefix == "uniopd:score:v2:team.a-1:"
    for bad in ("", "a:b", "a*", "-a", "x" * 65, "beta:uniopd"):
        with pytest.raises(ValueError, match="cache namespace"):
            ScoreCache(None, namespace=bad)
    with pytest.raises(ValidationError) as exc:
        CacheConfig(namespace="a:b")
    assert validation_message(exc.value).startswith("namespace: ")


def test_the_wire_float_type_is_part_of_the_key_and_float32_keys_are_unchanged():
    item = random_items(np.random.default_rng(7), 1)[0]
    digest = "a" * 64
    assert key_part(digest) == digest and ScoreCache.key(key_part(digest), item) == ScoreCache.key(digest, item)
    assert ScoreCache.key(key_part(digest, "float16"), item) != ScoreCache.key(digest, item)
