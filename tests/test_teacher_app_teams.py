"""The teacher app in-process, shared by teams: API keys (401s, keys file and env, hot reload on change and on
SIGHUP), per-team quotas and usage, per-team metrics, and fair scheduling of a flood against a small team.

A held ScorerDouble makes "in flight" and "queued" exact states instead of timing windows. The same behaviours on
real server processes are the e2e tier's test_auth_and_limits.py and test_team_quotas.py."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from pathlib import Path

import pytest
from fastapi import FastAPI

from proto.client import TeacherClient
from services.common.auth import KeysFileError, KeyStore
from services.rollout_server.app import create_app as create_rollout_app
from services.teacher_server.app import create_app
from services.teacher_server.limits import Limits
from tests.doubles import GeneratorDouble, ScorerDouble
from tests.inprocess import BASE_URL, bearer, running, transport, until

FILE_KEY = "team-a-0123456789"
ENV_KEY = "team-b-abcdef"
BODY = {"items": [{"input_ids": [1, 2, 3, 4], "response_start": 2}]}


def body(response_tokens: int, items: int = 1, prompt: int = 4, first: int = 1) -> dict:
    """Items that ask for `response_tokens` scored tokens each (what the quota counts); `first` tags the sender."""
    ids = [first] + [(7 * i) % 500 + 1 for i in range(1, prompt + response_tokens)]
    return {"items": [{"input_ids": ids, "response_start": prompt}] * items}


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def teams_app(scorer: ScorerDouble, keys: KeyStore, limits: Limits | None = None) -> FastAPI:
    return create_app(lambda: scorer, domains=["math"], limits=limits or Limits(batch_wait_ms=1), api_keys=keys,
                      open_metrics=True)


def store(tmp_path: Path, text: str, monkeypatch, env: str = "", **kw) -> KeyStore:
    monkeypatch.setenv("UNIOPD_API_KEYS", env)
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    return KeyStore.from_file(path, **kw)


# ---- auth ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def guarded(tmp_path, monkeypatch) -> FastAPI:
    return teams_app(ScorerDouble(), store(tmp_path, f"# team a\n{FILE_KEY}\n\n", monkeypatch, env=ENV_KEY))


@pytest.mark.parametrize("path", ["/v1/score", "/generate", "/v1/completions"])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {FILE_KEY}", f"Bearer {FILE_KEY}x"])
async def test_scoring_routes_refuse_without_a_valid_key(guarded, path, header):
    async with running(guarded) as client:
        resp = await client.post(path, json=BODY, headers={"Authorization": header} if header else {})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized" and resp.headers["www-authenticate"] == "Bearer"
    assert guarded.state.service.scorer.calls == []


@pytest.mark.parametrize("key", [FILE_KEY, ENV_KEY])
async def test_keys_from_the_file_and_the_env_are_accepted(guarded, key):
    async with running(guarded, headers=bearer(key)) as client:
        assert (await client.post("/v1/score", json=BODY)).status_code == 200
        assert (await client.get("/v1/info")).status_code == 200
        assert (await client.get("/v1/usage")).json()["team"] == "default"


async def test_probes_need_no_key_and_everything_else_does(guarded):
    async with running(guarded) as client:
        for path in ("/v1/info", "/v1/usage"):
            assert (await client.get(path)).status_code == 401
        for path in ("/healthz", "/readyz"):
            assert (await client.get(path)).status_code == 200


@pytest.mark.parametrize("kind", ["teacher", "rollout"])
async def test_metrics_are_closed_by_default_once_there_are_api_keys(tiny_model, kind):
    """A server with keys (a team file or plain keys) and no --metrics-keys: /metrics names every team, so it answers
    403 to everyone, an API key included, unless started with --open-metrics; without keys it stays open."""
    def make(keys, **kw):
        return (create_app(lambda: ScorerDouble(), api_keys=keys, **kw) if kind == "teacher"
                else create_rollout_app(lambda: GeneratorDouble(), tiny_model, api_keys=keys, **kw))

    for keys, opened, want in (([FILE_KEY], False, 403), ([FILE_KEY], True, 200), ([], False, 200)):
        async with running(make(keys, open_metrics=opened)) as client:
            for headers in ({}, bearer(FILE_KEY)):
                resp = await client.get("/metrics", headers=headers)
                assert resp.status_code == want, (keys, opened, headers)
            if want == 403:
                assert resp.json()["error"]["code"] == "metrics_closed"
                assert "--metrics-keys" in resp.json()["error"]["message"]


@pytest.mark.parametrize("kind", ["teacher", "rollout"])
async def test_metrics_can_ask_for_a_metrics_key(tiny_model, kind):
    """/metrics names every team and its usage: with --metrics-keys it wants one of them, and only for itself."""
    metrics_key = "scraper-key-0123"
    app = (create_app(lambda: ScorerDouble(), api_keys=[FILE_KEY], metrics_keys=[metrics_key]) if kind == "teacher"
           else create_rollout_app(lambda: GeneratorDouble(), tiny_model, api_keys=[FILE_KEY],
                                   metrics_keys=[metrics_key]))
    async with running(app) as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/metrics", headers=bearer(FILE_KEY))).status_code == 401  # an API key is not one
        assert (await client.get("/metrics", headers=bearer(metrics_key))).status_code == 200
        assert (await client.get("/v1/info", headers=bearer(metrics_key))).status_code == 401
        assert (await client.get("/healthz")).status_code == 200


OPEN_TEAM_FILE = """teams:
  alpha: {keys: [key-alpha-1]}
  keyless: {unauthenticated: true, tokens_per_minute: 1000, weight: 2}
"""


async def test_a_team_file_can_admit_keyless_callers_as_a_named_team(tmp_path, monkeypatch):
    """slime, miles and the Uni-OPD release send no Authorization header: they become `keyless`, with its quota."""
    app = teams_app(ScorerDouble(), store(tmp_path, OPEN_TEAM_FILE, monkeypatch))
    async with running(app) as client:
        keyless = await client.post("/v1/score", json=BODY)
        usage = (await client.get("/v1/usage")).json()
        alpha = (await client.get("/v1/usage", headers=bearer("key-alpha-1"))).json()
        wrong = await client.post("/v1/score", json=BODY, headers={"Authorization": "Bearer key-alpha-2"})
        other_scheme = await client.post("/v1/score", json=BODY, headers={"Authorization": "Basic key-alpha-1"})
    assert keyless.status_code == 200 and usage["team"] == "keyless" and usage["requests"] == 1
    assert usage["limits"]["tokens_per_minute"] == 1000 and alpha["team"] == "alpha"
    assert wrong.status_code == other_scheme.status_code == 401  # a key that is sent must be right


@pytest.mark.parametrize(("text", "error"), [
    ("teams:\n  a: {unauthenticated: true}\n  b: {unauthenticated: true}\n", "teams.b.unauthenticated: "),
    ("teams:\n  a: {keys: []}\n", "teams.a.keys: no keys"),
])
def test_the_unauthenticated_team_is_one_at_most_and_others_need_keys(tmp_path, monkeypatch, text, error):
    with pytest.raises(KeysFileError, match=error):
        store(tmp_path, text, monkeypatch)


async def test_openapi_declares_bearer_auth(guarded):
    async with running(guarded) as client:
        spec = (await client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/score"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


async def test_a_plain_key_list_is_one_unlimited_team():
    app = create_app(ScorerDouble, api_keys=["k1", "k2"])
    async with running(app) as client:
        assert (await client.post("/v1/score", json=BODY, headers=bearer("k2"))).status_code == 200
        assert (await client.post("/v1/score", json=BODY, headers=bearer("k3"))).status_code == 401


async def test_keys_file_reloads_on_change_and_a_bad_file_keeps_the_keys(tmp_path, monkeypatch, caplog):
    keys = store(tmp_path, "teams:\n  one: {keys: [key-1], tokens_per_minute: 100000}\n  two: {keys: [key-two]}\n",
                 monkeypatch, interval=0.0)  # looked at on every request
    async with running(teams_app(ScorerDouble(), keys)) as client:
        async def status(key: str) -> int:
            return (await client.post("/v1/score", json=body(5), headers=bearer(key))).status_code

        assert (await status("key-1"), await status("key-2")) == (200, 401)
        write_atomically(keys.path, "teams:\n  one: {keys: [key-2], tokens_per_minute: 100000}\n"
                                    "  two: {keys: [key-two]}\n")
        assert (await status("key-2"), await status("key-1")) == (200, 401)
        usage = (await client.get("/v1/usage", headers=bearer("key-2"))).json()
        assert usage["team"] == "one" and usage["requests"] == 2  # the team's usage survived the reload
        with caplog.at_level(logging.ERROR, logger="uniopd.auth"):
            write_atomically(keys.path, "teams:\n  one: {keys: [key-3], weight: -1}\n")
            assert (await status("key-2"), await status("key-3")) == (200, 401)  # no lockout
        assert any("keys file not reloaded" in r.getMessage() and "teams.one.weight" in r.getMessage()
                   for r in caplog.records)


async def test_sighup_reloads_an_edit_the_change_check_cannot_see(tmp_path, monkeypatch):
    """An in-place edit keeping size, inode and mtime: only the signal picks it up."""
    assert threading.current_thread() is threading.main_thread()  # where the app installs its handler
    keys = store(tmp_path, "teams:\n  one: {keys: [key-4]}\n", monkeypatch, interval=3600.0)
    async with running(teams_app(ScorerDouble(), keys)) as client:
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)  # or the signal would end pytest
        before = keys.path.stat()
        keys.path.write_text("teams:\n  one: {keys: [key-5]}\n")
        os.utime(keys.path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (await client.post("/v1/score", json=BODY, headers=bearer("key-5"))).status_code == 401
        table = keys.table
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: keys.table is not table, "SIGHUP to reload the keys")
        assert (await client.post("/v1/score", json=BODY, headers=bearer("key-5"))).status_code == 200
        assert (await client.post("/v1/score", json=BODY, headers=bearer("key-4"))).status_code == 401
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # the lifespan removed its handler


# ---- quotas --------------------------------------------------------------------------------------------------------

QUOTA_TEAMS = """teams:
  alpha: {keys: [key-alpha], tokens_per_minute: 100}
  beta:  {keys: [key-beta]}
  gamma: {keys: [key-gamma], max_concurrent: 1}
  delta: {keys: [key-delta], tokens_per_minute: 1000}
  epsilon: {keys: [key-epsilon], tokens_per_minute: 10}
"""
ALL_KEYS = ("key-alpha", "key-beta", "key-gamma", "key-delta", "key-epsilon")


@pytest.fixture
def quota_keys(tmp_path, monkeypatch) -> KeyStore:
    return store(tmp_path, QUOTA_TEAMS, monkeypatch)


async def test_tokens_per_minute_answers_429_with_retry_after_on_every_scoring_route(quota_keys):
    double = ScorerDouble()
    async with running(teams_app(double, quota_keys)) as client:
        assert (await client.post("/v1/score", json=body(60), headers=bearer("key-alpha"))).status_code == 200
        refused = await client.post("/v1/score", json=body(60), headers=bearer("key-alpha"))
        compat = {"prompt": list(range(1, 62)), "max_tokens": 0, "prompt_logprobs": 0,  # 60 scored tokens
                  "return_tokens_as_token_ids": True}
        via_openai = await client.post("/v1/completions", json=compat, headers=bearer("key-alpha"))
        sglang = {"input_ids": list(range(1, 62)), "return_logprob": True, "logprob_start_len": 1,
                  "sampling_params": {"max_new_tokens": 0}}
        via_sglang = await client.post("/generate", json=sglang, headers=bearer("key-alpha"))
        too_big = await client.post("/v1/score", json=body(11), headers=bearer("key-epsilon"))  # over 10 a minute
        others = [await client.post("/v1/score", json=body(60), headers=bearer("key-beta")) for _ in range(3)]
    err = refused.json()["error"]
    assert refused.status_code == 429 and err["code"] == "quota_exceeded" and err["field"] == "tokens_per_minute"
    assert "tokens_per_minute 100" in err["message"]
    # 40 tokens left, 20 short at 100 tokens a minute: 12 s (a little less once time has passed, never below 1)
    assert 1 <= int(refused.headers["retry-after"]) <= 12
    for resp in (via_openai, via_sglang):
        assert resp.status_code == 429 and resp.json()["error"]["field"] == "tokens_per_minute"
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_over_quota"
    assert all(r.status_code == 200 for r in others)  # another team is unaffected
    assert len(double.calls) == 4  # refused requests never reached the scorer


async def test_concurrency_limit_answers_429_and_other_teams_proceed(quota_keys):
    double = ScorerDouble(held=True)
    app = teams_app(double, quota_keys)
    async with running(app) as client:
        first = asyncio.create_task(client.post("/v1/score", json=body(5), headers=bearer("key-gamma")))
        await asyncio.to_thread(double.gate.entered.wait, 10)
        assert (await client.get("/v1/usage", headers=bearer("key-gamma"))).json()["in_flight"] == 1
        refused = await client.post("/v1/score", json=body(5), headers=bearer("key-gamma"))
        other = asyncio.create_task(client.post("/v1/score", json=body(5), headers=bearer("key-beta")))
        await until(lambda: app.state.service.batcher.depth == 2, "team beta's request queued")
        double.gate.open()
        assert (await first).status_code == 200 and (await other).status_code == 200
        again = await client.post("/v1/score", json=body(5), headers=bearer("key-gamma"))
        usage = (await client.get("/v1/usage", headers=bearer("key-gamma"))).json()
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["field"] == "max_concurrent"
    assert again.status_code == 200
    assert (usage["in_flight"], usage["requests"], usage["rejected"]) == (0, 2, {"max_concurrent": 1})


async def test_usage_shows_only_the_callers_team(quota_keys):
    app = teams_app(ScorerDouble(), quota_keys)
    async with running(app) as client:
        assert (await client.post("/v1/score", json=body(30, items=2), headers=bearer("key-delta"))).status_code == 200
        resp = await client.get("/v1/usage", headers=bearer("key-delta"))
        no_key, unknown = await client.get("/v1/usage"), await client.get("/v1/usage", headers=bearer("key-nobody"))
        async with TeacherClient(BASE_URL, api_key="key-delta", transport=transport(app)) as teacher:
            via_client = await teacher.usage()
    assert resp.status_code == 200
    assert resp.json() == {
        "team": "delta", "limits": {"tokens_per_minute": 1000, "max_concurrent": None, "weight": 1},
        "requests": 1, "scored_tokens": 60, "rejected": {}, "in_flight": 0,
        "tokens_available": resp.json()["tokens_available"]}
    assert 940 <= resp.json()["tokens_available"] <= 1000
    assert not any(word in resp.text for word in ("alpha", "beta", "gamma", *ALL_KEYS))
    assert no_key.status_code == unknown.status_code == 401
    assert via_client.scored_tokens == 60 and via_client.team == "delta"


async def test_metrics_count_per_team_never_per_key(quota_keys):
    async with running(teams_app(ScorerDouble(), quota_keys)) as client:
        assert (await client.post("/v1/score", json=body(8), headers=bearer("key-epsilon"))).status_code == 200
        assert (await client.post("/v1/score", json=body(8), headers=bearer("key-epsilon"))).status_code == 429
        text = (await client.get("/metrics")).text
    assert 'uniopd_team_requests_total{team="epsilon"} 1.0' in text
    assert 'uniopd_team_scored_tokens_total{team="epsilon"} 8.0' in text
    assert 'uniopd_team_rejected_total{reason="tokens_per_minute",team="epsilon"} 1.0' in text
    assert not any(key in text for key in ALL_KEYS)


# ---- fair scheduling -----------------------------------------------------------------------------------------------

FAIR_TEAMS = """teams:
  flood: {keys: [key-flood, key-flood-2]}
  small: {keys: [key-small]}
"""
FLOOD, SMALL = 7, 9  # first token of each sender's items, to tell them apart in the scorer's calls
FLOOD_REQUESTS, FLOOD_ITEMS = 10, 8


async def scoring_order(tmp_path, monkeypatch, small_key: str) -> list[int]:
    """Team flood queues ten requests of eight 100-token items behind a held scorer call (two items); then three
    small requests arrive. Returns the senders of the items scored after the held call, in scoring order."""
    double = ScorerDouble(held=True)
    keys = store(tmp_path, FAIR_TEAMS, monkeypatch)
    app = teams_app(double, keys, Limits(max_batch_tokens=256, batch_wait_ms=1))
    async with running(app) as client:
        def post(key: str, payload: dict) -> asyncio.Task:
            return asyncio.create_task(client.post("/v1/score", json=payload, headers=bearer(key)))

        flood = [post("key-flood", body(96, items=FLOOD_ITEMS, first=FLOOD)) for _ in range(FLOOD_REQUESTS)]
        await until(lambda: app.state.service.batcher.depth == FLOOD_REQUESTS * FLOOD_ITEMS, "the flood queued")
        small = [post(small_key, body(16, first=SMALL)) for _ in range(3)]
        await until(lambda: app.state.service.batcher.depth == FLOOD_REQUESTS * FLOOD_ITEMS + 3, "small queued")
        double.gate.open()
        assert all(r.status_code == 200 for r in await asyncio.gather(*flood, *small))
    assert [len(call) for call in double.calls[:1]] == [2]  # a 256-token budget: two flood items a call
    return [it.input_ids[0] for call in double.calls[1:] for it in call]


async def test_a_flood_does_not_starve_another_team(tmp_path, monkeypatch):
    order = await scoring_order(tmp_path, monkeypatch, "key-small")
    # served in turn: the small team's items go in the very next scorer call, not behind the 78 queued flood items
    assert [i for i, sender in enumerate(order) if sender == SMALL] == [1, 2, 3], order


async def test_control_the_same_requests_in_one_team_wait_behind_the_flood(tmp_path, monkeypatch):
    order = await scoring_order(tmp_path, monkeypatch, "key-flood-2")  # same team: one FIFO lane
    queued_ahead = FLOOD_REQUESTS * FLOOD_ITEMS - 2
    assert order[:queued_ahead] == [FLOOD] * queued_ahead and order[queued_ahead:] == [SMALL] * 3
