"""Both backends as real server processes over loopback HTTP: the same suite for each."""

from __future__ import annotations

import asyncio
import re

import httpx
import msgpack
import numpy as np
import pytest
from transformers import AutoTokenizer

from proto.client import TeacherClient
from proto.codec import encode_score_request
from proto.errors import ApiError
from proto.schemas import MSGPACK, ScoreItem
from tests.conftest import random_items

pytestmark = pytest.mark.e2e  # real server processes, both backends

TOL = 1e-4


def post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kw)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_health_ready_and_info(teacher, tiny_model):
    assert httpx.get(teacher.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(teacher.url + "/readyz").status_code == 200
    info = httpx.get(teacher.url + "/v1/info").json()
    assert info["backend"] == teacher.backend
    assert info["vocab_size"] == 512 and info["domains"] == ["math"] and info["api_version"] == "v1"
    assert info["dtype"] == "float32" and info["max_top_k"] == 128
    assert info["limits"]["max_batch_tokens"] == 2048  # no --max-batch-tokens, no GPU: the CPU budget
    from proto.fingerprint import model_revision

    assert info["revision"] == model_revision(tiny_model)
    assert info["fingerprint"]["revision"] == info["revision"]
    assert info["fingerprint"]["tokenizer"] == info["tokenizer_fingerprint"]


def test_the_probes_and_info_routes_launch_scripts_call(teacher, tiny_model):
    """SGLang's and OpenAI's shapes, as slime/miles launch scripts and OpenAI clients read them."""
    for path in ("/health", "/health_generate"):
        resp = httpx.get(teacher.url + path, timeout=30)
        assert resp.status_code == 200 and resp.content == b""
    model_info = httpx.get(teacher.url + "/get_model_info").json()
    assert model_info["model_path"] == str(tiny_model) and model_info["is_generation"] is True
    assert httpx.get(teacher.url + "/get_server_info").json()["context_length"] == \
        httpx.get(teacher.url + "/v1/info").json()["max_length"]
    models = httpx.get(teacher.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [str(tiny_model)]
    assert models["data"][0]["object"] == "model" and models["data"][0]["max_model_len"] > 0


@pytest.mark.parametrize("binary", [False, True])
def test_scores_match_direct_transformers(teacher, reference, binary):
    items = random_items(np.random.default_rng(1), 12)

    async def go():
        async with TeacherClient(teacher.url, binary=binary) as client:
            return await client.score(items)

    fingerprint, spans = asyncio.run(go())
    assert fingerprint.backend == teacher.backend
    for item, span in zip(items, spans, strict=True):
        assert span.logprobs.shape == (len(item.input_ids) - item.response_start,)
        np.testing.assert_allclose(span.logprobs, reference.span(item.input_ids, item.response_start), atol=TOL)


def test_json_and_binary_are_identical(teacher):
    items = random_items(np.random.default_rng(2), 5, top_k=4)

    async def go(binary):
        async with TeacherClient(teacher.url, binary=binary) as client:
            fp, spans = await client.score(items)
            return fp, spans, client.bytes_received

    fp_json, json_spans, json_bytes = asyncio.run(go(False))
    fp_bin, bin_spans, bin_bytes = asyncio.run(go(True))
    assert fp_json == fp_bin
    for a, b in zip(json_spans, bin_spans, strict=True):
        assert np.array_equal(a.logprobs, b.logprobs)
        assert np.array_equal(a.top_k_ids, b.top_k_ids) and np.array_equal(a.top_k_logprobs, b.top_k_logprobs)
    assert bin_bytes < json_bytes


def test_top_k(teacher, reference):
    items = random_items(np.random.default_rng(3), 3, top_k=5) + random_items(np.random.default_rng(4), 2)

    async def go():
        async with TeacherClient(teacher.url) as client:
            return await client.score(items)

    _, spans = asyncio.run(go())
    for item, span in zip(items, spans, strict=True):
        if not item.top_k:
            assert span.top_k_ids is None
            continue
        full = reference.logprobs(item.input_ids)[item.response_start - 1 : len(item.input_ids) - 1]
        want_ids = np.argsort(-full, axis=-1)[:, :5]
        assert span.top_k_ids.shape == (len(span.logprobs), 5)
        np.testing.assert_allclose(span.top_k_logprobs, np.take_along_axis(full, want_ids, -1), atol=TOL)
        assert np.array_equal(span.top_k_ids, want_ids)
        assert (np.diff(span.top_k_logprobs, axis=-1) <= 0).all()
        assert (span.logprobs <= span.top_k_logprobs[:, 0] + TOL).all()


@pytest.mark.parametrize("binary", [False, True])
def test_full_distribution_matches_transformers(teacher, reference, binary):
    """Both backends: the whole log-distribution at every response position, next to items that did not ask."""
    items = [it.model_copy(update={"distribution": True}) for it in random_items(np.random.default_rng(7), 2)]
    items += random_items(np.random.default_rng(8), 1)

    async def go():
        async with TeacherClient(teacher.url, binary=binary) as client:
            return await client.score(items)

    _, spans = asyncio.run(go())
    for item, span in zip(items, spans, strict=True):
        if not item.distribution:
            assert span.distribution is None
            continue
        full = reference.logprobs(item.input_ids)[item.response_start - 1 : len(item.input_ids) - 1]
        assert span.distribution.shape == full.shape
        np.testing.assert_allclose(span.distribution, full, atol=TOL)
        np.testing.assert_allclose(np.exp(span.distribution).sum(-1), 1.0, atol=1e-4)


def _item(**kw) -> dict:
    return {"input_ids": [1, 2, 3, 4], "response_start": 2, **kw}


INVALID = [
    ({"items": []}, 422, "items"),
    ({"items": [_item(input_ids=[1])]}, 422, "items[0].input_ids"),
    ({"items": [_item(input_ids=[1, 2, 512])]}, 422, "items[0].input_ids[2]"),
    ({"items": [_item(input_ids=[1, -2, 3])]}, 422, "items[0].input_ids[1]"),
    ({"items": [_item(input_ids=[1, 2.5, 3])]}, 422, "items[0].input_ids[1]"),
    ({"items": [_item(response_start=0)]}, 422, "items[0].response_start"),
    ({"items": [_item(response_start=4)]}, 422, "items[0].response_start"),
    ({"items": [_item(top_k=129)]}, 422, "items[0].top_k"),
    ({"items": [_item(top_k=-1)]}, 422, "items[0].top_k"),
    ({"items": [_item(input_ids=list(range(500)) * 3)]}, 422, "items[0].input_ids"),
    ({"items": [_item(surprise=1)]}, 422, "items[0].surprise"),
    ({"itemz": []}, 422, "items"),
    ([1, 2], 422, None),
]


@pytest.mark.parametrize(("body", "status", "field"), INVALID)
def test_validation_errors(teacher, body, status, field):
    resp = post(teacher, "/v1/score", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["field"] == field and err["code"] and err["message"]


def test_malformed_bodies(teacher):
    assert post(teacher, "/v1/score", content=b"{not json").status_code == 400
    bad = post(teacher, "/v1/score", content=b"\xc1\xff", headers={"Content-Type": MSGPACK})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_body"
    odd = msgpack.packb({"items": [{"input_ids": b"\x01\x00\x00", "response_start": 1}]})
    resp = post(teacher, "/v1/score", content=odd, headers={"Content-Type": MSGPACK})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "items[0].input_ids"
    assert post(teacher, "/v1/score", content=b"x", headers={"Content-Type": "text/plain"}).status_code == 415
    assert httpx.get(teacher.url + "/nope").json()["error"]["code"] == "not_found"
    assert httpx.get(teacher.url + "/healthz").status_code == 200  # the server survived all of it


def test_binary_request_out_of_vocab_names_token(teacher):
    body = encode_score_request([ScoreItem(input_ids=[1, 2, 3], response_start=1)], binary=True)
    raw = msgpack.unpackb(body)
    raw["items"][0]["input_ids"] = np.array([1, 9999, 3], dtype="<i4").tobytes()
    resp = post(teacher, "/v1/score", content=msgpack.packb(raw), headers={"Content-Type": MSGPACK})
    assert resp.status_code == 422 and resp.json()["error"]["field"] == "items[0].input_ids[1]"


def test_concurrent_requests_are_coalesced(teacher, reference):
    before = httpx.get(teacher.url + "/metrics").text
    calls_before = metric(before, "uniopd_batch_requests_count")
    reqs_before = metric(before, "uniopd_batch_requests_sum")
    batches = [random_items(np.random.default_rng(10 + i), 2) for i in range(16)]

    async def go():
        async with TeacherClient(teacher.url) as client:
            return await asyncio.gather(*(client.score(b) for b in batches))

    results = asyncio.run(go())
    for items, (_, spans) in zip(batches, results, strict=True):  # each request got its own items back
        for item, span in zip(items, spans, strict=True):
            np.testing.assert_allclose(span.logprobs, reference.span(item.input_ids, item.response_start), atol=TOL)
    after = httpx.get(teacher.url + "/metrics").text
    calls = metric(after, "uniopd_batch_requests_count") - calls_before
    requests = metric(after, "uniopd_batch_requests_sum") - reqs_before
    assert requests == 16
    assert calls < 16, f"16 concurrent requests took {calls} scorer calls: nothing was coalesced"
    assert metric(after, "uniopd_queue_depth") == 0
    assert 'uniopd_requests_total{route="/v1/score",status="200"}' in after
    assert "uniopd_request_latency_seconds_bucket" in after and "uniopd_scored_tokens_total" in after


def test_client_raises_api_error(teacher):
    async def go():
        async with TeacherClient(teacher.url) as client:
            await client.score([ScoreItem(input_ids=[1, 2, 600], response_start=1)])

    with pytest.raises(ApiError) as exc:
        asyncio.run(go())
    assert exc.value.status == 422 and exc.value.field == "items[0].input_ids[2]"


# ---- compatibility endpoints -------------------------------------------------------------------------------------

def test_sglang_generate_as_slime_parses_it(teacher, reference):
    ids = list(range(10, 40))
    response_length = 12
    payload = {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
               "sampling_params": {"temperature": 0, "max_new_tokens": 0, "skip_special_tokens": False}}
    out = post(teacher, "/generate", json=payload).json()
    entries = out["meta_info"]["input_token_logprobs"]
    assert len(entries) == len(ids) and entries[0][0] is None and [e[1] for e in entries] == ids
    teacher_lps = np.array([e[0] for e in entries[1:]], dtype=np.float32)[-response_length:]  # slime's parsing
    np.testing.assert_allclose(teacher_lps, reference.span(ids, len(ids) - response_length), atol=TOL)
    assert out["text"] == "" and out["meta_info"]["completion_tokens"] == 0


def test_sglang_generate_batch_start_and_top(teacher, reference):
    seqs = [list(range(5, 25)), list(range(30, 42))]
    payload = {"input_ids": seqs, "return_logprob": True, "logprob_start_len": [4, -1], "top_logprobs_num": 3,
               "token_ids_logprob": [3, 77, 200], "sampling_params": {"max_new_tokens": 0}}
    outs = post(teacher, "/generate", json=payload).json()
    assert isinstance(outs, list) and len(outs) == 2
    first = outs[0]["meta_info"]
    assert len(first["input_token_logprobs"]) == 16
    np.testing.assert_allclose([e[0] for e in first["input_token_logprobs"]], reference.span(seqs[0], 4), atol=TOL)
    assert len(first["input_top_logprobs"][0]) == 3
    full = reference.logprobs(seqs[0])[3:-1]  # the distributions that predict positions 4..
    np.testing.assert_allclose([[lp for lp, _, _ in row] for row in first["input_token_ids_logprobs"]],
                               full[:, [3, 77, 200]], atol=TOL)
    assert len(outs[1]["meta_info"]["input_token_logprobs"]) == 1


@pytest.mark.parametrize(("payload", "field"), [
    ({"input_ids": [1, 2, 3], "return_logprob": True, "sampling_params": {"max_new_tokens": 8}},
     "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2, 3], "return_logprob": False, "sampling_params": {"max_new_tokens": 0}}, "return_logprob"),
    ({"text": "hi", "input_ids": [1, 2], "return_logprob": True, "sampling_params": {"max_new_tokens": 0}}, "text"),
])
def test_sglang_generate_rejects_generation(teacher, payload, field):
    resp = post(teacher, "/generate", json=payload)
    assert resp.status_code == 400 and resp.json()["error"]["field"] == field


@pytest.mark.parametrize(("payload", "field"), [
    ({"input_ids": [1, 2, 3], "return_logprob": True, "sampling_params": {}}, "sampling_params.max_new_tokens"),
    ({"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3, "sampling_params": {"max_new_tokens": 0}},
     "logprob_start_len"),
    ({"input_ids": [[1, 2, 3], [4]], "return_logprob": True, "sampling_params": {"max_new_tokens": 0}},
     "input_ids[1]"),
    ({"input_ids": [1, 2, 3], "return_logprob": [True, True], "sampling_params": {"max_new_tokens": 0}},
     "return_logprob"),
])
def test_sglang_generate_invalid_fields(teacher, payload, field):
    resp = post(teacher, "/generate", json=payload)
    assert resp.status_code in (400, 422) and resp.json()["error"]["field"] == field, resp.text


def test_openai_completions_prompt_logprobs(teacher, reference, tiny_model):
    ids = list(range(50, 70))
    out = post(teacher, "/v1/completions", json={"model": "x", "prompt": ids, "max_tokens": 1,
                                                 "prompt_logprobs": 2}).json()
    choice = out["choices"][0]
    plp = choice["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    got = [plp[p][str(ids[p])]["logprob"] for p in range(1, len(ids))]
    np.testing.assert_allclose(got, reference.span(ids, 1), atol=TOL)
    assert all(len(set(entry) | {str(ids[p])}) <= 3 for p, entry in enumerate(plp) if entry)
    assert out["object"] == "text_completion" and out["usage"]["prompt_tokens"] == len(ids)
    # as vLLM: every token's rank is an integer, also outside the top 2, and tokens are decoded text
    full = reference.logprobs(ids)
    want = [int((full[p - 1] > full[p - 1, ids[p]]).sum()) + 1 for p in range(1, len(ids))]
    assert [plp[p][str(ids[p])]["rank"] for p in range(1, len(ids))] == want and max(want) > 2
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert [plp[p][str(ids[p])]["decoded_token"] for p in range(1, len(ids))] == [tokenizer.decode([t])
                                                                                for t in ids[1:]]
    greedy = int(reference.logprobs([*ids, 0])[len(ids) - 1].argmax())
    assert choice["text"] == tokenizer.decode([greedy])


def test_openai_completions_echo_logprobs(teacher, reference):
    ids = list(range(3, 15))
    out = post(teacher, "/v1/completions", json={"prompt": [ids], "max_tokens": 0, "echo": True,
                                                 "logprobs": 1}).json()
    lp = out["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    np.testing.assert_allclose(lp["token_logprobs"][1:], reference.span(ids, 1), atol=TOL)


def test_openai_echo_with_max_tokens_1_appends_the_greedy_token(teacher, reference):
    """lm-eval's request: the prompt's n entries, then the generated token's, which is transformers' argmax."""
    ids = list(range(3, 15))
    out = post(teacher, "/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                 "temperature": 0, "return_tokens_as_token_ids": True}).json()
    lp = out["choices"][0]["logprobs"]
    next_lp = reference.logprobs([*ids, 0])[len(ids) - 1]  # the distribution after the whole prompt
    assert len(lp["token_logprobs"]) == len(ids) + 1 and out["usage"]["completion_tokens"] == 1
    np.testing.assert_allclose(lp["token_logprobs"][1:-1], reference.span(ids, 1), atol=TOL)
    assert lp["tokens"][-1] == f"token_id:{int(next_lp.argmax())}"
    assert lp["token_logprobs"][-1] == pytest.approx(float(next_lp.max()), abs=TOL)




@pytest.mark.parametrize("binary", [False, True])
def test_candidates_match_transformers(teacher, reference, binary):
    """Both backends: per-position and shared candidates, their log-probs and the tail over the rest."""
    rng = np.random.default_rng(11)
    items = random_items(rng, 3)
    n = len(items[0].input_ids) - items[0].response_start
    items[0] = items[0].model_copy(update={"candidates": [rng.permutation(512)[:16].tolist() for _ in range(n)]})
    items[1] = items[1].model_copy(update={"candidates": [[9, 2, 300, 41]]})

    async def go():
        async with TeacherClient(teacher.url, binary=binary) as client:
            return await client.info(), await client.score(items)

    info, (_, spans) = asyncio.run(go())
    assert info.candidate_scoring == ("full-distribution" if teacher.backend == "vllm" else "gather")
    assert spans[2].candidate_logprobs is None
    for item, span in zip(items[:2], spans[:2], strict=True):
        full = reference.logprobs(item.input_ids)[item.response_start - 1 : len(item.input_ids) - 1]
        cand = np.broadcast_to(np.asarray(item.candidates), span.candidate_logprobs.shape)
        np.testing.assert_allclose(span.candidate_logprobs, np.take_along_axis(full, cand, -1), atol=TOL)
        rest = np.ones_like(full, dtype=bool)
        np.put_along_axis(rest, cand, False, -1)
        want_tail = np.log(np.where(rest, np.exp(full.astype(np.float64)), 0).sum(-1))
        np.testing.assert_allclose(span.tail_logprobs, want_tail, atol=TOL)


def test_vllm_token_in_token_out_scoring_matches_transformers(teacher, reference):
    """Both backends: stock vLLM's prompt_logprob_token_ids request, decoded as its clients decode it."""
    import base64
    import io

    ids, start = list(range(40, 60)), 5
    rows = [[11, 300, 2, -1]] * (len(ids) - 1 - start)
    out = post(teacher, "/inference/v1/generate", json={"token_ids": ids, "sampling_params": {
        "max_tokens": 1, "prompt_logprob_token_ids": rows, "prompt_logprob_start": start}}).json()
    matrix = np.load(io.BytesIO(base64.b64decode(out["prompt_token_id_logprobs"])), allow_pickle=False)
    full = reference.logprobs(ids)[start: len(ids) - 1]
    np.testing.assert_allclose(matrix[:, :3], full[:, [11, 300, 2]], atol=TOL)
    assert np.isneginf(matrix[:, 3]).all()
    assert out["choices"][0]["token_ids"] == [int(reference.logprobs([*ids, 0])[len(ids) - 1].argmax())]


def test_samples_of_one_prompt_score_as_each_sequence_alone(teacher, reference):
    """A prompt that a request's samples share is computed once (transformers: one prompt pass; vLLM: its prefix
    cache, whose 32-token blocks the 300-token prompt fills 9 times, the first sample going first); the scores are
    those of each sequence whole. The same sequences scored again find their blocks cached up to inside a response
    (the 150-token one), which vLLM must then score without the cache; and a prompt of whole blocks (288 tokens),
    whose cached blocks would reach its response, is scored without reading the cache."""
    rng = np.random.default_rng(11)
    head = rng.integers(0, 512, 300).tolist()
    items = [ScoreItem(input_ids=head[:p] + rng.integers(0, 512, n).tolist(), response_start=p)
             for p, n in ((300, 20), (300, 1), (288, 9), (300, 35), (300, 150), (288, 30), (300, 20), (300, 7))]

    async def go():
        async with TeacherClient(teacher.url, binary=True) as client:
            return [(await client.score(items))[1] for _ in range(2)]

    for spans in asyncio.run(go()):
        for item, span in zip(items, spans, strict=True):
            np.testing.assert_allclose(span.logprobs, reference.span(item.input_ids, item.response_start), atol=TOL)
