"""The teacher app in-process (create_app over a ScorerDouble, or the real HFScorer on the tiny model): probes, info,
/v1/score in JSON and msgpack, request limits, micro-batching, and the SGLang / OpenAI scoring compat routes.

The same behaviours against real server processes (both backends) are the e2e tier's test_teacher_server.py and
test_auth_and_limits.py."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator

import msgpack
import numpy as np
import pytest
from fastapi import FastAPI

from proto.client import TeacherClient
from proto.codec import encode_score_request
from proto.errors import ApiError
from proto.fingerprint import make_fingerprint
from proto.schemas import MSGPACK, ScoreItem
from services.teacher_server.app import create_app
from services.teacher_server.limits import Limits
from services.teacher_server.scorer import Scorer
from tests.conftest import random_items
from tests.doubles import ScorerDouble
from tests.inprocess import BASE_URL, running, transport, until, wait_loaded

TOL = 1e-4


def teacher_app(scorer: Scorer, limits: Limits | None = None) -> FastAPI:
    return create_app(lambda: scorer, domains=["math"], limits=limits or Limits(batch_wait_ms=1))


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def item(ids: list[int], start: int, top_k: int = 0) -> dict:
    return {"input_ids": ids, "response_start": start, "top_k": top_k}


@pytest.fixture(scope="session")
def hf_scorer(tiny_model):
    from services.teacher_server.backends.hf import HFScorer

    return HFScorer(tiny_model, dtype="float32", device="cpu")


# ---- probes and info ---------------------------------------------------------------------------------------------

async def test_probes_answer_while_loading_and_info_describes_the_loaded_scorer():
    double, loading = ScorerDouble(), threading.Event()
    app = create_app(lambda: loading.wait(30) and double, domains=["math"], limits=Limits(max_batch_items=7))
    async with running(app, loaded=False) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["error"]["code"] == "not_ready"
        assert not_ready.headers["retry-after"] == "5"
        assert (await client.post("/v1/score", json={"items": [item([1, 2, 3], 1)]})).status_code == 503
        assert (await client.get("/v1/info")).status_code == 503
        loading.set()
        await wait_loaded(app)
        assert (await client.get("/readyz")).json() == {"status": "ready"}
        info = (await client.get("/v1/info")).json()
    i = double.info()
    want = make_fingerprint(i.model, i.revision, i.tokenizer_fingerprint, i.dtype, i.backend)
    assert info["fingerprint"] == want.model_dump()
    assert (info["model"], info["backend"], info["vocab_size"], info["max_top_k"]) == ("scorer-double-0", "double",
                                                                                        512, 20)
    assert info["domains"] == ["math"] and info["api_version"] == "v1"
    assert info["limits"] == Limits(max_batch_items=7).as_dict() and info["limits"]["max_batch_items"] == 7


async def test_a_scorer_that_fails_to_load_is_reported_not_served():
    def load() -> Scorer:
        raise RuntimeError("no weights here")

    app = create_app(load)
    async with running(app) as client:
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "load_failed"
        assert "RuntimeError: no weights here" in ready.json()["error"]["message"]
        assert (await client.post("/v1/score", json={"items": [item([1, 2, 3], 1)]})).status_code == 503
        assert (await client.get("/healthz")).status_code == 200


async def test_openapi_states_the_loaded_models_limits():
    app = teacher_app(ScorerDouble(max_length=300, max_top_k=5), Limits(max_batch_items=9))
    async with running(app) as client:
        schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    props = schemas["ScoreItem"]["properties"]
    assert props["input_ids"]["items"]["maximum"] == 511 and props["input_ids"]["maxItems"] == 300
    assert props["top_k"]["maximum"] == 5 and schemas["ScoreRequest"]["properties"]["items"]["maxItems"] == 9


# ---- /v1/score -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [False, True])
async def test_score_returns_each_items_response_span_and_top_k(binary):
    double = ScorerDouble(seed=3)
    items = random_items(np.random.default_rng(1), 6) + random_items(np.random.default_rng(2), 3, top_k=4)
    app = teacher_app(double)
    async with running(app), TeacherClient(BASE_URL, binary=binary, transport=transport(app)) as client:
        fingerprint, spans = await client.score(items)
    assert fingerprint == app.state.service.fingerprint
    for it, span in zip(items, spans, strict=True):
        want = double.span(it.input_ids, it.response_start, it.top_k)
        np.testing.assert_array_equal(span.logprobs, want.logprobs)
        assert span.k == it.top_k
        if it.top_k:
            np.testing.assert_array_equal(span.top_k_ids, want.top_k_ids)
            np.testing.assert_array_equal(span.top_k_logprobs, want.top_k_logprobs)


async def test_json_and_msgpack_carry_the_same_scores_and_msgpack_is_smaller():
    items = random_items(np.random.default_rng(2), 5, top_k=4)
    app = teacher_app(ScorerDouble())
    async with running(app):
        results = {}
        for binary in (False, True):
            async with TeacherClient(BASE_URL, binary=binary, transport=transport(app)) as client:
                results[binary] = (*await client.score(items), client.bytes_received)
    (fp_json, json_spans, json_bytes), (fp_bin, bin_spans, bin_bytes) = results[False], results[True]
    assert fp_json == fp_bin and bin_bytes < json_bytes
    for a, b in zip(json_spans, bin_spans, strict=True):
        assert np.array_equal(a.logprobs, b.logprobs) and np.array_equal(a.top_k_ids, b.top_k_ids)
        assert np.array_equal(a.top_k_logprobs, b.top_k_logprobs)


@pytest.mark.parametrize("binary", [False, True])
async def test_hf_scores_match_direct_transformers(hf_scorer, reference, binary):
    items = random_items(np.random.default_rng(1), 8) + random_items(np.random.default_rng(3), 3, top_k=5)
    app = teacher_app(hf_scorer)
    async with running(app), TeacherClient(BASE_URL, binary=binary, transport=transport(app)) as client:
        fingerprint, spans = await client.score(items)
    assert fingerprint.backend == "hf"
    for it, span in zip(items, spans, strict=True):
        np.testing.assert_allclose(span.logprobs, reference.span(it.input_ids, it.response_start), atol=TOL)
        if it.top_k:
            full = reference.logprobs(it.input_ids)[it.response_start - 1 : len(it.input_ids) - 1]
            want_ids = np.argsort(-full, axis=-1)[:, : it.top_k]
            assert np.array_equal(span.top_k_ids, want_ids)
            np.testing.assert_allclose(span.top_k_logprobs, np.take_along_axis(full, want_ids, -1), atol=TOL)


@pytest.mark.parametrize("binary", [False, True])
async def test_full_distributions_ride_next_to_items_that_did_not_ask(binary):
    double = ScorerDouble(seed=4)
    rng = np.random.default_rng(5)
    items = [it.model_copy(update={"distribution": True}) for it in random_items(rng, 3)] + random_items(rng, 2)
    app = teacher_app(double)
    async with running(app), TeacherClient(BASE_URL, binary=binary, transport=transport(app)) as client:
        _, spans = await client.score(items)
    for it, span in zip(items, spans, strict=True):
        want = double.span(it.input_ids, it.response_start, distribution=it.distribution)
        np.testing.assert_array_equal(span.logprobs, want.logprobs)
        if it.distribution:
            assert span.distribution.shape == (len(span.logprobs), 512)
            np.testing.assert_array_equal(span.distribution, want.distribution)
        else:
            assert span.distribution is None


@pytest.mark.parametrize("binary", [False, True])
async def test_candidates_per_position_and_shared_ride_next_to_plain_items(binary):
    double = ScorerDouble(seed=4)
    rng = np.random.default_rng(5)
    plain = random_items(rng, 3)
    per_position = plain[0].model_copy(update={"candidates": [rng.permutation(512)[:8].tolist() for _ in range(
        len(plain[0].input_ids) - plain[0].response_start)]})
    shared = plain[1].model_copy(update={"candidates": [[7, 3, 400]]})
    items = [per_position, shared, plain[2]]
    app = teacher_app(double)
    async with running(app), TeacherClient(BASE_URL, binary=binary, transport=transport(app)) as client:
        _, spans = await client.score(items)
    for it, span in zip(items, spans, strict=True):
        want = double.span(it.input_ids, it.response_start, candidates=it.candidates)
        np.testing.assert_array_equal(span.logprobs, want.logprobs)
        if it.candidates is None:
            assert span.candidate_logprobs is None and span.tail_logprobs is None
            continue
        assert span.candidate_logprobs.shape == (len(span.logprobs), len(it.candidates[0]))
        np.testing.assert_array_equal(span.candidate_logprobs, want.candidate_logprobs)
        np.testing.assert_array_equal(span.tail_logprobs, want.tail_logprobs)
        rows = double.table[np.asarray(it.input_ids[it.response_start - 1 : -1])]
        cand = np.broadcast_to(np.asarray(it.candidates), span.candidate_logprobs.shape)
        np.testing.assert_allclose(span.candidate_logprobs, np.take_along_axis(rows, cand, -1), rtol=1e-6)
        np.testing.assert_allclose(np.logaddexp(np.logaddexp.reduce(span.candidate_logprobs, -1),
                                                span.tail_logprobs), 0.0, atol=1e-5)


@pytest.mark.parametrize("binary", [False, True])
async def test_ranks_are_returned_where_asked(binary):
    double = ScorerDouble(seed=3)
    items = random_items(np.random.default_rng(4), 3)
    items[1] = items[1].model_copy(update={"ranks": True})
    app = teacher_app(double)
    async with running(app), TeacherClient(BASE_URL, binary=binary, transport=transport(app)) as client:
        _, spans = await client.score(items)
    want = double.span(items[1].input_ids, items[1].response_start, ranks=True).ranks
    assert spans[0].ranks is None and spans[2].ranks is None
    assert spans[1].ranks.tolist() == want.tolist() and min(want) >= 1


async def test_candidate_values_count_against_the_request_limit():
    limits = Limits(batch_wait_ms=1, max_distribution_values=40)
    async with running(teacher_app(ScorerDouble(), limits)) as client:
        fits = await client.post("/v1/score", json={"items": [{**item([1, 2, 3, 4, 5, 6], 1), "candidates": [
            list(range(8))]}]})  # 5 positions x 8
        over = await client.post("/v1/score", json={"items": [{**item([1, 2, 3, 4, 5, 6, 7], 1), "candidates": [
            list(range(8))]}]})
    assert fits.status_code == 200 and len(fits.json()["results"][0]["candidate_logprobs"]) == 5
    assert over.status_code == 413 and "need 48 values" in over.json()["error"]["message"]


async def test_hf_distribution_matches_direct_transformers(hf_scorer, reference):
    items = [it.model_copy(update={"distribution": True}) for it in random_items(np.random.default_rng(6), 3)]
    app = teacher_app(hf_scorer)
    async with running(app), TeacherClient(BASE_URL, transport=transport(app)) as client:
        _, spans = await client.score(items)
    for it, span in zip(items, spans, strict=True):
        full = reference.logprobs(it.input_ids)[it.response_start - 1 : len(it.input_ids) - 1]
        np.testing.assert_allclose(span.distribution, full, atol=TOL)


async def test_distributions_are_bounded_per_request():
    limits = Limits(batch_wait_ms=1, max_distribution_values=512 * 10)
    async with running(teacher_app(ScorerDouble(), limits)) as client:
        info = (await client.get("/v1/info")).json()
        fits = await client.post("/v1/score", json={"items": [{**item([1, 2, 3, 4, 5, 6], 1), "distribution": True},
                                                              {**item([1, 2, 3, 4, 5, 6], 1), "distribution": True}]})
        over = await client.post("/v1/score", json={"items": [{**item([1] * 12, 1), "distribution": True}]})
        plain = await client.post("/v1/score", json={"items": [item([1] * 12, 1)]})
    assert info["limits"]["max_distribution_values"] == 5120
    assert fits.status_code == 200 and plain.status_code == 200
    assert over.status_code == 413 and over.json()["error"]["code"] == "distribution_too_large"
    assert over.json()["error"]["field"] == "items" and "need 5632 values" in over.json()["error"]["message"]


INVALID = [
    ({"items": []}, 422, "items"),
    ({"items": [item([1], 1)]}, 422, "items[0].input_ids"),
    ({"items": [item([1, 2, 512], 2)]}, 422, "items[0].input_ids[2]"),
    ({"items": [item([1, -2, 3], 2)]}, 422, "items[0].input_ids[1]"),
    ({"items": [item([1, 2.5, 3], 2)]}, 422, "items[0].input_ids[1]"),
    ({"items": [item([1, 2, 3, 4], 0)]}, 422, "items[0].response_start"),
    ({"items": [item([1, 2, 3, 4], 4)]}, 422, "items[0].response_start"),
    ({"items": [item([1, 2, 3, 4], 2, top_k=21)]}, 422, "items[0].top_k"),
    ({"items": [item([1, 2, 3, 4], 2, top_k=-1)]}, 422, "items[0].top_k"),
    ({"items": [item(list(range(500)) * 3, 2)]}, 422, "items[0].input_ids"),
    ({"items": [{**item([1, 2, 3, 4], 2), "surprise": 1}]}, 422, "items[0].surprise"),
    ({"items": [item([1, 2, 3], 1), item([1, 2, 3], 1, top_k=30)]}, 422, "items[1].top_k"),
    ({"itemz": []}, 422, "items"),
    ([1, 2], 422, None),
    ({"items": [{**item([1, 2, 3, 4], 2), "candidates": [[5, 6], [5, 6], [5, 6]]}]}, 422, "items[0].candidates"),
    ({"items": [{**item([1, 2, 3, 4], 2), "candidates": [[5, 6], [5]]}]}, 422, "items[0].candidates[1]"),
    ({"items": [{**item([1, 2, 3, 4], 2), "candidates": [[5, 5]]}]}, 422, "items[0].candidates[0]"),
    ({"items": [{**item([1, 2, 3, 4], 2), "candidates": [[5, 512]]}]}, 422, "items[0].candidates[0][1]"),
    ({"items": [{**item([1, 2, 3, 4], 2), "candidates": [[]]}]}, 422, "items[0].candidates"),
    ({"items": [{**item([1, 2, 3, 4], 2), "candidates": []}]}, 422, "items[0].candidates"),
    ({"items": [{**item([1, 2, 3, 4], 2), "candidates": [list(range(21))]}]}, 422, "items[0].candidates"),
]


@pytest.mark.parametrize(("body", "status", "field"), INVALID)
async def test_invalid_requests_name_the_field(body, status, field):
    double = ScorerDouble()
    async with running(teacher_app(double)) as client:
        resp = await client.post("/v1/score", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["field"] == field and err["code"] and err["message"]
    assert double.calls == []  # refused before it reached the scorer


async def test_malformed_bodies_and_unknown_paths():
    async with running(teacher_app(ScorerDouble())) as client:
        assert (await client.post("/v1/score", content=b"{not json")).status_code == 400
        bad = await client.post("/v1/score", content=b"\xc1\xff", headers={"Content-Type": MSGPACK})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_body"
        odd = msgpack.packb({"items": [{"input_ids": b"\x01\x00\x00", "response_start": 1}]})
        resp = await client.post("/v1/score", content=odd, headers={"Content-Type": MSGPACK})
        assert resp.status_code == 422 and resp.json()["error"]["field"] == "items[0].input_ids"
        text = await client.post("/v1/score", content=b"x", headers={"Content-Type": "text/plain"})
        assert text.status_code == 415
        assert (await client.get("/nope")).json()["error"]["code"] == "not_found"
        assert (await client.get("/v1/score")).json()["error"]["code"] == "method_not_allowed"


async def test_compat_probes_pass_through_the_scorer_and_info_routes_name_the_model_path():
    scorer = ScorerDouble()
    app = create_app(lambda: scorer, limits=Limits(batch_wait_ms=1), api_keys=["key-0123"], model_path="/models/t")
    async with running(app) as client:
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health_generate")).status_code == 200  # probes need no key
        assert scorer.calls and scorer.calls[-1][0].input_ids == [0, 0]  # a real pass went through the scorer
        for path in ("/get_model_info", "/get_server_info", "/v1/models"):
            assert (await client.get(path)).status_code == 401
        headers = {"Authorization": "Bearer key-0123"}
        assert (await client.get("/get_model_info", headers=headers)).json()["model_path"] == "/models/t"
        models = (await client.get("/v1/models", headers=headers)).json()
    assert models["data"][0]["id"] == "/models/t" and models["data"][0]["max_model_len"] == 1024


async def test_the_compat_probes_answer_503_until_the_model_is_loaded():
    def failing():
        raise RuntimeError("no such model")

    app = create_app(failing)
    async with running(app, loaded=False) as client:
        await until(lambda: app.state.service.load_error, "the load to fail")
        for path in ("/health", "/health_generate"):
            assert (await client.get(path)).status_code == 503


async def test_a_json_body_with_too_many_items_is_refused_before_it_is_parsed():
    """600 items (limit 512) followed by garbage: 413, not the 400 a parse would give."""
    items = b",".join([b'{"input_ids": [1, 2], "response_start": 1}'] * 600)
    scorer = ScorerDouble()
    async with running(teacher_app(scorer)) as client:
        resp = await client.post("/v1/score", content=b'{"items": [' + items + b"], {not json")
    error = resp.json()["error"]
    assert resp.status_code == 413 and (error["code"], error["field"]) == ("batch_too_large", "items")
    assert "JSON objects (counted before parsing)" in error["message"] and "512 items" in error["message"]
    assert scorer.calls == []


async def test_binary_request_out_of_vocab_names_the_token():
    raw = msgpack.unpackb(encode_score_request([ScoreItem(input_ids=[1, 2, 3], response_start=1)], binary=True))
    raw["items"][0]["input_ids"] = np.array([1, 9999, 3], dtype="<i4").tobytes()
    async with running(teacher_app(ScorerDouble())) as client:
        resp = await client.post("/v1/score", content=msgpack.packb(raw), headers={"Content-Type": MSGPACK})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "items[0].input_ids[1]"


async def test_client_raises_the_servers_api_error():
    app = teacher_app(ScorerDouble())
    async with running(app), TeacherClient(BASE_URL, transport=transport(app)) as client:
        with pytest.raises(ApiError) as exc:
            await client.score([ScoreItem(input_ids=[1, 2, 600], response_start=1)])
    assert exc.value.status == 422 and exc.value.field == "items[0].input_ids[2]"


async def test_top_k_is_bounded_by_the_scorers_max_top_k():
    async with running(teacher_app(ScorerDouble(max_top_k=5))) as client:
        refused = await client.post("/v1/score", json={"items": [item([1, 2, 3, 4], 2, top_k=6)]})
        served = await client.post("/v1/score", json={"items": [item([1, 2, 3, 4], 2, top_k=5)]})
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "items[0].top_k"
    assert "<= 5" in refused.json()["error"]["message"]
    assert served.status_code == 200 and len(served.json()["results"][0]["top_k_ids"][0]) == 5


# ---- limits --------------------------------------------------------------------------------------------------------

LIMITED = Limits(max_queue_items=8, max_batch_items=8, batch_wait_ms=1, max_body_bytes=20000, max_request_tokens=300)


async def test_declared_body_over_the_limit_is_refused_unread():
    double = ScorerDouble()
    async with running(teacher_app(double, LIMITED)) as client:
        resp = await client.post("/v1/score", content=b"x" * 20001, headers={"Content-Type": "application/json"})
        at_limit = await client.post("/v1/score", content=b"x" * 20000, headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"
    assert at_limit.status_code == 400  # within the limit: read, then refused as malformed JSON
    assert double.calls == []


async def test_streamed_body_over_the_limit_is_cut_off():
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b" " * 1000

    async with running(teacher_app(ScorerDouble(), LIMITED)) as client:
        resp = await client.post("/v1/score", content=chunks(), headers={"Content-Type": "application/json"})
    assert "content-length" not in resp.request.headers  # chunked: only counting can catch it
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "body_too_large"


async def test_too_many_items_and_too_many_tokens():
    async with running(teacher_app(ScorerDouble(), LIMITED)) as client:
        many = await client.post("/v1/score", json={"items": [item([1, 2], 1)] * 9})
        eight = await client.post("/v1/score", json={"items": [item([1, 2], 1)] * 8})
        long = await client.post("/v1/score", json={"items": [item([1] * 200, 1)] * 2})
    assert many.status_code == 413 and many.json()["error"] == {
        "code": "batch_too_large", "message": "9 items; limit is 8", "field": "items"}
    assert eight.status_code == 200
    assert long.status_code == 413 and long.json()["error"]["code"] == "request_too_large"


async def test_full_queue_answers_429_with_retry_after_and_recovers():
    double = ScorerDouble(held=True)
    app = teacher_app(double, LIMITED)
    big = encode_score_request(random_items(np.random.default_rng(0), 8, lo=4, hi=30), binary=True)
    small = encode_score_request(random_items(np.random.default_rng(1), 1, lo=4, hi=30), binary=True)
    headers = {"Content-Type": MSGPACK}
    async with running(app) as client:
        first = asyncio.create_task(client.post("/v1/score", content=big, headers=headers))
        await until(lambda: app.state.service.batcher.depth == 8, "8 items in flight")
        refused = await client.post("/v1/score", content=small, headers=headers)
        double.gate.open()
        assert (await first).status_code == 200
        assert (await client.post("/v1/score", content=small, headers=headers)).status_code == 200
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"
    assert 'uniopd_requests_total{route="/v1/score",status="429"} 1.0' in metrics
    assert 'uniopd_requests_total{route="/v1/score",status="200"} 2.0' in metrics


async def test_concurrent_requests_are_coalesced_and_each_gets_its_own_items():
    """The first request holds the scorer; the fifteen that arrive meanwhile share the next scorer calls."""
    double = ScorerDouble(held=True)
    app = teacher_app(double, Limits(batch_wait_ms=1, max_batch_tokens=16384))
    batches = [random_items(np.random.default_rng(10 + i), 2) for i in range(16)]
    async with running(app) as client, TeacherClient(BASE_URL, transport=transport(app)) as teacher:
        tasks = [asyncio.create_task(teacher.score(batches[0]))]
        await asyncio.to_thread(double.gate.entered.wait, 10)
        tasks += [asyncio.create_task(teacher.score(b)) for b in batches[1:]]
        await until(lambda: app.state.service.batcher.depth == 32, "every request queued")
        double.gate.open()
        results = await asyncio.gather(*tasks)
        metrics = (await client.get("/metrics")).text
    for items, (_, spans) in zip(batches, results, strict=True):
        for it, span in zip(items, spans, strict=True):
            np.testing.assert_array_equal(span.logprobs, double.span(it.input_ids, it.response_start).logprobs)
    assert [len(call) for call in double.calls] == [2, 30]
    assert metric(metrics, "uniopd_batch_requests_count") == 2 and metric(metrics, "uniopd_batch_requests_sum") == 16
    assert metric(metrics, "uniopd_queue_depth") == 0
    scored = sum(len(it.input_ids) - it.response_start for b in batches for it in b)
    assert metric(metrics, "uniopd_scored_tokens_total") == scored
    assert "uniopd_request_latency_seconds_bucket" in metrics


# ---- compatibility routes ------------------------------------------------------------------------------------------

def lps(entries: list) -> np.ndarray:
    return np.array([e[0] for e in entries], dtype=np.float32)


async def test_sglang_generate_as_slime_parses_it():
    double = ScorerDouble(seed=5)
    ids, response_length = list(range(10, 40)), 12
    payload = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
               "sampling_params": {"temperature": 0, "max_new_tokens": 0, "skip_special_tokens": False}}
    async with running(teacher_app(double)) as client:
        out = (await client.post("/generate", json=payload)).json()
    entries = out["meta_info"]["input_token_logprobs"]
    assert len(entries) == len(ids) and entries[0][0] is None and [e[1] for e in entries] == ids
    teacher_lps = lps(entries[1:])[-response_length:]  # slime's parsing
    np.testing.assert_array_equal(teacher_lps, double.span(ids, len(ids) - response_length).logprobs)
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 0
    assert out["meta_info"]["prompt_tokens"] == len(ids)


async def test_sglang_generate_batch_with_per_sequence_start_and_top_logprobs():
    double = ScorerDouble(seed=6)
    seqs = [list(range(5, 25)), list(range(30, 42))]
    payload = {"input_ids": seqs, "return_logprob": True, "logprob_start_len": [4, -1], "top_logprobs_num": 3,
               "sampling_params": {"max_new_tokens": 0}, "rid": "req-7"}
    async with running(teacher_app(double)) as client:
        outs = (await client.post("/generate", json=payload)).json()
    assert isinstance(outs, list) and len(outs) == 2 and {o["meta_info"]["id"] for o in outs} == {"req-7"}
    first, second = outs[0]["meta_info"], outs[1]["meta_info"]
    want = double.span(seqs[0], 4, top_k=3)
    np.testing.assert_array_equal(lps(first["input_token_logprobs"]), want.logprobs)
    assert [[t for _, t, _ in row] for row in first["input_top_logprobs"]] == want.top_k_ids.tolist()
    assert len(second["input_token_logprobs"]) == 1  # -1: the last token only
    np.testing.assert_array_equal(lps(second["input_token_logprobs"]), double.span(seqs[1], 11).logprobs)


async def test_sglang_token_ids_logprob_as_miles_reads_it():
    """One list for all positions (SGLang's form, miles' union mode): entry 0 is null, every other position holds
    [logprob, id, null] for each id in the order asked."""
    double = ScorerDouble(seed=8)
    ids, union = list(range(40, 60)), [17, 3, 250, 99]
    payload = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0, "token_ids_logprob": union,
               "sampling_params": {"max_new_tokens": 0}}
    async with running(teacher_app(double)) as client:
        meta = (await client.post("/generate", json=payload)).json()["meta_info"]
    itil = meta["input_token_ids_logprobs"]
    assert len(itil) == len(ids) and itil[0] is None and meta["output_token_ids_logprobs"] == []
    want = double.span(ids, 1, candidates=[union])
    assert all([tok for _, tok, _ in row] == union for row in itil[1:])
    np.testing.assert_array_equal(np.array([[lp for lp, _, _ in row] for row in itil[1:]], np.float32),
                                  want.candidate_logprobs)


async def test_sglang_token_ids_logprob_per_position_in_a_batch_beside_top_logprobs():
    double = ScorerDouble(seed=9)
    seqs = [list(range(5, 25)), list(range(30, 42))]
    per_position = [[p, p + 1, 300] for p in range(len(seqs[0]) - 4)]  # positions 4.. of the first sequence
    payload = {"input_ids": seqs, "return_logprob": True, "logprob_start_len": [4, -1], "top_logprobs_num": 2,
               "token_ids_logprob": [per_position, [7, 8]], "sampling_params": {"max_new_tokens": 0}}
    async with running(teacher_app(double)) as client:
        outs = (await client.post("/generate", json=payload)).json()
    first, second = outs[0]["meta_info"], outs[1]["meta_info"]
    want = double.span(seqs[0], 4, top_k=2, candidates=per_position)
    assert [[tok for _, tok, _ in row] for row in first["input_token_ids_logprobs"]] == per_position
    np.testing.assert_array_equal(np.array([[lp for lp, _, _ in row] for row in first["input_token_ids_logprobs"]],
                                           np.float32), want.candidate_logprobs)
    assert [[t for _, t, _ in row] for row in first["input_top_logprobs"]] == want.top_k_ids.tolist()
    assert [[tok for _, tok, _ in row] for row in second["input_token_ids_logprobs"]] == [[7, 8]]


@pytest.mark.parametrize(("candidates", "says"), [
    (list(range(21)), "--max-top-k"), ([5, 5], "distinct"), ([[5], [6]], "one per scored position"), ([], "at least"),
])
async def test_sglang_token_ids_logprob_refusals_name_the_field(candidates, says):
    payload = {"input_ids": [1, 2, 3, 4], "return_logprob": True, "logprob_start_len": 1,
               "token_ids_logprob": candidates, "sampling_params": {"max_new_tokens": 0}}
    async with running(teacher_app(ScorerDouble())) as client:
        resp = await client.post("/generate", json=payload)
    err = resp.json()["error"]
    assert resp.status_code == 422 and err["field"].startswith("token_ids_logprob") and says in err["message"], err


@pytest.mark.parametrize(("payload", "field"), [
    ({"input_ids": [1, 2, 3], "return_logprob": True, "sampling_params": {"max_new_tokens": 8}},
     "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2, 3], "return_logprob": False, "sampling_params": {"max_new_tokens": 0}}, "return_logprob"),
    ({"text": "hi", "input_ids": [1, 2], "return_logprob": True, "sampling_params": {"max_new_tokens": 0}}, "text"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "stream": True, "sampling_params": {"max_new_tokens": 0}},
     "stream"),
])
async def test_sglang_generate_refuses_generation_with_400(payload, field):
    async with running(teacher_app(ScorerDouble())) as client:
        resp = await client.post("/generate", json=payload)
    assert resp.status_code == 400 and resp.json()["error"]["field"] == field, resp.text


@pytest.mark.parametrize(("payload", "field"), [
    ({"input_ids": [1, 2, 3], "return_logprob": True, "sampling_params": {}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3, "sampling_params": {"max_new_tokens": 0}},
     "logprob_start_len"),
    ({"input_ids": [[1, 2, 3], [4]], "return_logprob": True, "sampling_params": {"max_new_tokens": 0}},
     "input_ids[1]"),
    ({"input_ids": [1, 2, 3], "return_logprob": [True, True], "sampling_params": {"max_new_tokens": 0}},
     "return_logprob"),
    ({"input_ids": [1, 2, 600], "return_logprob": True, "sampling_params": {"max_new_tokens": 0}},
     "items[0].input_ids[2]"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "image_data": "iVBORw0KGgo=",
      "sampling_params": {"max_new_tokens": 0}}, "images"),  # a text-only teacher takes no images
    ({"input_ids": [[1, 2, 3], [4, 5]], "return_logprob": True, "image_data": ["iVBORw0KGgo="],
      "sampling_params": {"max_new_tokens": 0}}, "image_data"),
])
async def test_sglang_generate_invalid_fields(payload, field):
    async with running(teacher_app(ScorerDouble())) as client:
        resp = await client.post("/generate", json=payload)
    assert resp.status_code in (400, 422) and resp.json()["error"]["field"] == field, resp.text


async def test_openai_completions_prompt_logprobs():
    double = ScorerDouble(seed=7)
    ids = list(range(50, 70))
    async with running(teacher_app(double)) as client:
        out = (await client.post("/v1/completions", json={"model": "x", "prompt": ids, "max_tokens": 1,
                                                          "prompt_logprobs": 2,
                                                          "return_tokens_as_token_ids": True})).json()
    plp = out["choices"][0]["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    want = double.span(ids, 1, top_k=2, ranks=True)
    got = np.array([plp[p][str(ids[p])]["logprob"] for p in range(1, len(ids))], dtype=np.float32)
    np.testing.assert_array_equal(got, want.logprobs)
    for p, top in zip(range(1, len(ids)), want.top_k_ids.tolist(), strict=True):
        assert {int(t) for t in plp[p]} == {ids[p], *top}  # the top 2 plus the actual token
        assert [plp[p][str(t)]["rank"] for t in top] == [1, 2]
    # the actual token's rank is an integer, also outside the top 2 (vLLM's layout)
    assert [plp[p][str(ids[p])]["rank"] for p in range(1, len(ids))] == want.ranks.tolist()
    assert any(r > 2 for r in want.ranks.tolist())
    assert out["object"] == "text_completion" and out["model"] == "scorer-double-7"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}
    greedy = int(double.span([*ids, 0], 1, top_k=1).top_k_ids[-1, 0])  # max_tokens 1: one token, greedily
    assert out["choices"][0]["text"] == f"token_id:{greedy}" and out["choices"][0]["logprobs"] is None


async def test_echo_with_max_tokens_1_has_vllms_layout_so_lm_eval_sums_the_right_tokens():
    """vLLM: n + 1 entries, the last the generated token's. lm-eval sums token_logprobs[ctxlen:-1]: that must be
    the continuation's log-prob, with nothing dropped."""
    double = ScorerDouble(seed=9)
    ids, ctxlen = list(range(20, 32)), 5
    async with running(teacher_app(double)) as client:
        body = {"prompt": ids, "echo": True, "logprobs": 2, "temperature": 0, "return_tokens_as_token_ids": True}
        scored = (await client.post("/v1/completions", json={**body, "max_tokens": 0})).json()["choices"][0]
        out = (await client.post("/v1/completions", json={**body, "max_tokens": 1})).json()
    choice, after = out["choices"][0], double.span([*ids, 0], 1, top_k=2)
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][:-1] == scored["logprobs"]["token_logprobs"]
    assert lp["tokens"][-1] == f"token_id:{after.top_k_ids[-1, 0]}" and choice["text"] == "".join(lp["tokens"])
    assert lp["token_logprobs"][-1] == pytest.approx(float(after.top_k_logprobs[-1, 0]))
    assert list(lp["top_logprobs"][-1]) == [f"token_id:{t}" for t in after.top_k_ids[-1]]
    assert lp["text_offset"][-1] == lp["text_offset"][-2] + len(lp["tokens"][-2])
    continuation = double.span(ids, 1).logprobs[ctxlen - 1:]
    assert sum(lp["token_logprobs"][ctxlen:-1]) == pytest.approx(float(continuation.sum()), rel=1e-6)
    assert out["usage"]["completion_tokens"] == 1


async def test_openai_completions_echo_logprobs():
    double = ScorerDouble(seed=8)
    ids = list(range(3, 15))
    async with running(teacher_app(double)) as client:
        out = (await client.post("/v1/completions", json={"prompt": [ids], "max_tokens": 0, "echo": True,
                                                          "logprobs": 1, "return_tokens_as_token_ids": True})).json()
        zero = (await client.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True,
                                                           "logprobs": 0, "return_tokens_as_token_ids": True})).json()
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["tokens"] == [f"token_id:{t}" for t in ids]
    np.testing.assert_array_equal(np.array(lp["token_logprobs"][1:], np.float32), double.span(ids, 1).logprobs)
    top = double.span(ids, 1, top_k=1).top_k_ids[:, 0].tolist()
    assert [next(iter(row)) for row in lp["top_logprobs"][1:]] == [f"token_id:{t}" for t in top]
    # vLLM's layout: the top 1 and the token itself, two entries where they differ, one where they are the same
    assert [len(row) for row in lp["top_logprobs"][1:]] == [1 if t == i else 2 for t, i in zip(top, ids[1:],
                                                                                            strict=True)]
    assert lp["text_offset"][:2] == [0, len("token_id:3")] and out["choices"][0]["text"] == "".join(lp["tokens"])
    assert zero["choices"][0]["logprobs"]["top_logprobs"][1:] == [{f"token_id:{t}": v} for t, v in zip(
        ids[1:], lp["token_logprobs"][1:], strict=True)]  # logprobs 0: {token: logprob}


@pytest.mark.parametrize(("payload", "status", "field"), [
    ({"prompt": [1, 2, 3], "max_tokens": 16, "prompt_logprobs": 0}, 400, "max_tokens"),
    ({"prompt": [1, 2, 3], "max_tokens": 1}, 400, "prompt_logprobs"),
    ({"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 0, "stream": True}, 400, "stream"),
    ({"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 0, "suffix": "x"}, 400, "suffix"),
    ({"prompt": [[1, 2, 3]], "max_tokens": 0, "prompt_logprobs": 0, "n": 2}, 400, "n"),
    ({"prompt": "hello", "max_tokens": 1, "prompt_logprobs": 0}, 422, "prompt"),
    ({"prompt": [[1, 2, 3], [7]], "max_tokens": 1, "prompt_logprobs": 0}, 422, "prompt[1]"),
    ({"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": -1}, 422, "prompt_logprobs"),
    ({"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 21, "return_tokens_as_token_ids": True}, 422,
     "items[0].top_k"),
    ({"prompt": [1, 2, 3], "max_tokens": 1, "prompt_logprobs": 2}, 400, "return_tokens_as_token_ids"),  # no tokenizer
])
async def test_openai_completions_refuses_what_it_does_not_score(payload, status, field):
    double = ScorerDouble()
    async with running(teacher_app(double)) as client:
        resp = await client.post("/v1/completions", json=payload)
    assert resp.status_code == status and resp.json()["error"]["field"] == field, resp.text
    assert double.calls == []


def npy(b64: str) -> np.ndarray:
    import base64
    import io

    return np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)


async def test_vllm_token_in_token_out_scoring_as_stock_vllm_shapes_it():
    """vLLM's /inference/v1/generate: prompt_logprob_token_ids from prompt_logprob_start (row i predicts token
    start + i + 1), -1 pads a row and scores -inf; the matrix comes back as base64 .npy float32."""
    double = ScorerDouble(seed=12)
    ids, start = list(range(30, 42)), 3
    rows = [[5, 9, -1], [7, 8, 2]] * 4  # len(ids) - 1 - start = 8 rows
    body = {"token_ids": ids, "sampling_params": {"max_tokens": 1, "prompt_logprob_token_ids": rows,
                                                  "prompt_logprob_start": start, "prompt_logprobs": 1},
            "return_token_ids": True}
    async with running(teacher_app(double)) as client:
        out = (await client.post("/inference/v1/generate", json=body)).json()
        bad = await client.post("/inference/v1/generate", json={**body, "sampling_params": {
            **body["sampling_params"], "prompt_logprob_token_ids": rows[:-1]}})
        generating = await client.post("/inference/v1/generate", json={"token_ids": ids, "sampling_params": {
            "max_tokens": 16, "prompt_logprobs": 1}})
    matrix = npy(out["prompt_token_id_logprobs"])
    assert matrix.dtype == np.float32 and matrix.shape == (8, 3)
    table = double.table[np.asarray(ids[start:-1])]  # rows predicting tokens start + 1 ..
    for i, row in enumerate(rows):
        for j, tok in enumerate(row):
            assert matrix[i, j] == (-np.inf if tok < 0 else table[i, tok])
    plp = out["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids) and out["prompt_token_ids"] == ids
    ranks = double.span(ids, 1, ranks=True).ranks.tolist()
    assert [plp[p][str(ids[p])]["rank"] for p in range(1, len(ids))] == ranks
    greedy = int(double.span([*ids, 0], 1, top_k=1).top_k_ids[-1, 0])
    assert out["choices"][0]["token_ids"] == [greedy] and out["usage"]["completion_tokens"] == 1
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "sampling_params.prompt_logprob_token_ids"
    assert generating.status_code == 400 and generating.json()["error"]["field"] == "sampling_params.max_tokens"


def test_the_default_batch_budget_follows_the_device():
    from services.teacher_server.limits import CPU_BATCH_TOKENS, batch_tokens_for

    assert batch_tokens_for("cpu") == CPU_BATCH_TOKENS < Limits.max_batch_tokens == batch_tokens_for("cuda:0")
