"""Bodies measured before they are parsed (issue 34, item 3): no spelling, encoding or route escapes the count, and a
team its quotas refuse makes the server parse nothing.

The teacher app runs in-process over ScorerDouble (tests/inprocess.py); what is checked is that an over-budget body
is refused with a 413 naming the field the client sent, that a body exactly at the budget is not, and that the
refusals come before the parser (a body that is not even valid JSON gets the 413 or 429, never the parser's 400)."""

from __future__ import annotations

import asyncio
import json

import msgpack
import numpy as np
import pytest

from proto.body_budget import BodyBudget, check_json, declared_items, json_counts, unpack_msgpack
from proto.errors import ApiError
from proto.schemas import JSON, MSGPACK
from services.teacher_server.limits import Limits
from tests.doubles import ScorerDouble
from tests.inprocess import bearer, running
from tests.test_teacher_app_teams import QUOTA_TEAMS, body, store, teams_app

LIMITS = Limits(max_batch_items=8, max_request_tokens=4096, max_distribution_values=4096, batch_wait_ms=1)
ITEM = b'{"input_ids": [1, 2, 3], "response_start": 1}'
ESCAPED = b'{"input\\u005fids": [1, 2, 3], "response\\u005fstart": 1}'  # the same item, keys spelled with escapes


def score_body(n: int, item: bytes = ITEM, tail: bytes = b"") -> bytes:
    return b'{"items": [' + b",".join([item] * n) + b"]" + tail + b"}"


async def post(client, path: str, content: bytes, kind: str = JSON, key: str | None = None):
    headers = {"content-type": kind, **(bearer(key) if key else {})}
    return await client.post(path, content=content, headers=headers)


@pytest.mark.parametrize("item", [ITEM, ESCAPED], ids=["plain-keys", "escaped-keys"])
async def test_one_item_over_the_limit_is_refused_before_parsing_however_its_keys_are_spelled(item):
    scorer = ScorerDouble()
    async with running(teams_app_open(scorer)) as client:
        at_limit = await post(client, "/v1/score", score_body(8, item))
        over = await post(client, "/v1/score", score_body(9, item, b", {not json"))
    assert at_limit.status_code == 200 and len(at_limit.json()["results"]) == 8
    err = over.json()["error"]
    assert over.status_code == 413 and (err["code"], err["field"]) == ("batch_too_large", "items")
    assert len(scorer.calls) == 1


def teams_app_open(scorer: ScorerDouble):
    from services.teacher_server.app import create_app

    return create_app(lambda: scorer, limits=LIMITS)


async def test_msgpack_items_are_counted_from_the_declared_length_wherever_the_key_sits():
    scorer = ScorerDouble()
    item = {"input_ids": np.array([1, 2, 3], "<i4").tobytes(), "response_start": 1}
    async with running(teams_app_open(scorer)) as client:
        ok = await post(client, "/v1/score", msgpack.packb({"images": [], "items": [item] * 8}), MSGPACK)
        # nine items, the key after another, and a body cut short: the header alone refuses it
        cut = msgpack.packb({"images": [b"x" * 100], "items": [item] * 9})[:-20]
        over = await post(client, "/v1/score", cut, MSGPACK)
    assert ok.status_code == 200
    assert over.status_code == 413 and over.json()["error"]["field"] == "items"
    assert declared_items(msgpack.packb({"float_dtype": "float32", "items": [1] * 70000})) == 70000
    assert declared_items(b"\x93\x01\x02\x03") is None  # not a map: the full unpack says what is wrong


def test_msgpack_unpacking_stops_once_the_lists_it_built_pass_the_budget():
    budget = BodyBudget(objects=4, arrays=8, values=1000, items=2)
    within = {"items": [{"input_ids": list(range(400)), "response_start": 1}] * 2}
    assert unpack_msgpack(msgpack.packb(within), budget) == within
    for over, what in (({"items": [{"input_ids": list(range(2000)), "response_start": 1}]}, "values"),
                       ({"items": [{"input_ids": [[1]] * 20, "response_start": 1}]}, "arrays"),
                       ({"items": [{"a": {"b": {"c": {"d": {}}}}}]}, "objects")):
        with pytest.raises(ApiError) as exc:
            unpack_msgpack(msgpack.packb(over), budget)
        assert exc.value.status == 413 and what in exc.value.message
    with pytest.raises(ApiError) as exc:
        unpack_msgpack(b"\xc1", budget)
    assert exc.value.status == 400


def test_json_counts_bound_what_a_parse_builds_and_strings_are_not_counted():
    doc = {"items": [{"input_ids": [1, 2, 3], "response_start": 1, "candidates": [[4, 5], [6, 7]]}], "x": [[]]}
    objects, arrays, values = json_counts(json.dumps(doc).encode())
    assert (objects, arrays) == (2, 7) and values >= 2 + 7 + 3 + 1 + 4
    text = BodyBudget(objects=2, arrays=2, values=64, items=1, text=True)
    noisy = json.dumps({"items": [{"text": "{[,]}" * 1000}]}).encode()  # structure characters inside a string
    check_json(noisy, text)
    check_json(noisy.replace(b"{[", b'\\"{[', 3), text)  # escaped quotes do not end the string
    with pytest.raises(ApiError) as exc:  # routes without free text count them: no legitimate body has them
        check_json(noisy, BodyBudget(objects=2, arrays=2, values=64, items=1))
    assert exc.value.status == 413 and exc.value.field == "items"
    with pytest.raises(ApiError):  # too many strings to be within budget: refused without the recount
        check_json(json.dumps({"items": [{"t": ["{"] * 300}]}).encode(), text)
    with pytest.raises(ApiError):
        check_json(b'{"items": [{}, {}, {}]}', text)


@pytest.mark.parametrize(("path", "field", "payload"), [
    ("/generate", "input_ids", {"input_ids": [[1, 2]] * 40, "return_logprob": True, "logprob_start_len": 1,
                                "sampling_params": {"max_new_tokens": 0}}),
    ("/v1/completions", "prompt", {"prompt": [[1, 2]] * 40, "max_tokens": 0, "prompt_logprobs": 0}),
    ("/inference/v1/generate", "token_ids", {"token_ids": list(range(9000)),
                                             "sampling_params": {"prompt_logprobs": 0}}),
])
async def test_every_scoring_route_refuses_an_over_budget_body_before_parsing_it(path, field, payload):
    """The compatibility routes used to be parsed by FastAPI before any check (10^6 SGLang sequences: 12.6 s)."""
    scorer = ScorerDouble()
    content = json.dumps(payload).encode()[:-1] + b", {not json}"
    async with running(teams_app_open(scorer)) as client:
        resp = await post(client, path, content)
    err = resp.json()["error"]
    assert resp.status_code == 413 and err["field"] == field, err
    assert scorer.calls == []


async def test_a_team_told_to_wait_gets_its_next_requests_refused_before_they_are_parsed(tmp_path, monkeypatch):
    """alpha (100 tokens a minute) is refused for 60 tokens with 40 left; until its bucket holds those 60, even a body
    that is not JSON gets the 429, not the parser's 400, and another team is served."""
    scorer = ScorerDouble()
    keys = store(tmp_path, QUOTA_TEAMS, monkeypatch)
    waits, sleep = [], asyncio.sleep

    async def recorded(seconds: float, *args):
        waits.append(seconds)
        await sleep(seconds, *args)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    async with running(teams_app(scorer, keys)) as client:
        assert (await client.post("/v1/score", json=body(60), headers=bearer("key-alpha"))).status_code == 200
        refused = await client.post("/v1/score", json=body(60), headers=bearer("key-alpha"))
        garbage = await post(client, "/v1/score", b"{not json" * 1000, key="key-alpha")
        small = await client.post("/v1/score", json=body(5), headers=bearer("key-alpha"))
        other = await client.post("/v1/score", json=body(60), headers=bearer("key-beta"))
        usage = (await client.get("/v1/usage", headers=bearer("key-alpha"))).json()
    assert refused.status_code == 429
    for resp in (garbage, small):  # a small request waits behind the refused one too (no starvation of big ones)
        assert resp.status_code == 429 and resp.json()["error"]["field"] == "tokens_per_minute"
        assert "60 needed before another request is read" in resp.json()["error"]["message"]
        assert resp.headers["connection"] == "close"  # the unread body is not drained either
    assert other.status_code == 200
    assert usage["rejected"]["tokens_per_minute"] == 3 and usage["in_flight"] == 0
    assert waits.count(Limits().refusal_delay_s) == 2  # the unread refusals were answered after the refusal delay


async def test_parsing_counts_against_max_concurrent(tmp_path, monkeypatch):
    """gamma (max_concurrent 1) with a request in the scorer: its next body is refused unread (429, not 400)."""
    scorer = ScorerDouble(held=True)
    keys = store(tmp_path, QUOTA_TEAMS, monkeypatch)
    async with running(teams_app(scorer, keys)) as client:
        first = asyncio.create_task(client.post("/v1/score", json=body(5), headers=bearer("key-gamma")))
        await asyncio.to_thread(scorer.gate.entered.wait, 10)
        second = await post(client, "/v1/score", b"{not json", key="key-gamma")
        scorer.gate.open()
        assert (await first).status_code == 200
    assert second.status_code == 429 and second.json()["error"]["field"] == "max_concurrent"


async def test_a_request_larger_than_the_whole_quota_spends_the_teams_minute(tmp_path, monkeypatch):
    """epsilon (10 tokens a minute) asks for 11: 413, and its next bodies are refused unread until the bucket is full
    again (a client that can never pass cannot make the server parse body after body)."""
    scorer = ScorerDouble()
    keys = store(tmp_path, QUOTA_TEAMS, monkeypatch)
    async with running(teams_app(scorer, keys)) as client:
        over = await client.post("/v1/score", json=body(11), headers=bearer("key-epsilon"))
        again = await post(client, "/v1/score", b"{not json", key="key-epsilon")
    assert over.status_code == 413 and over.json()["error"]["code"] == "request_over_quota"
    assert again.status_code == 429 and int(again.headers["retry-after"]) >= 59
    assert scorer.calls == []
