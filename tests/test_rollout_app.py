"""The rollout app in-process (create_app over a GeneratorDouble, or the real HFGenerator on the tiny model): info,
probes, generation in JSON and msgpack, chat prompts, request limits, auth with user and admin keys, weight-push
validation and the weight version.

The app loads the tiny model's tokenizer (chat prompts) and parameter shapes (weight checks) from its directory, so the
weight pushes below are the tiny model's real safetensors. Real server processes, both backends: the e2e tier's
test_rollout_server.py."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from safetensors.torch import load_file, save

from proto.client import RolloutClient
from proto.errors import ApiError
from proto.rollout import GenerateRequest, Rollouts
from services.common.limits import HeaderLimits
from services.rollout_server.app import create_app
from services.rollout_server.generator import Generator, SamplingOptions
from services.rollout_server.limits import RolloutLimits
from services.rollout_server.waves import MIB, RowCost, Segment, plan_waves, wave_rows
from tests.doubles import GeneratorDouble
from tests.inprocess import BASE_URL, bearer, running, transport
from uniopd.tiny_models import build_tiny_model

ADMIN = "admin-secret-1"
USER = "user-key-1"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-s5", "qwen3", seed=5)


@pytest.fixture
def weights_root(tiny_model, other_model, tmp_path) -> Path:
    shutil.copy(tiny_model / "model.safetensors", tmp_path / "original.safetensors")
    shutil.copy(other_model / "model.safetensors", tmp_path / "other.safetensors")
    return tmp_path


def rollout_app(generator: Generator, model_dir: Path, limits: RolloutLimits | None = None,
                weights_root: Path | None = None, admin: bool = True) -> FastAPI:
    return create_app(lambda: generator, model_dir, limits, api_keys=[USER], admin_keys=[ADMIN] if admin else [],
                      weights_root=weights_root, open_metrics=True)


def client_of(app: FastAPI, binary: bool = True) -> RolloutClient:
    return RolloutClient(BASE_URL, api_key=USER, admin_key=ADMIN, binary=binary, transport=transport(app))


async def generate(app: FastAPI, binary: bool = True, **kw) -> Rollouts:
    async with client_of(app, binary) as client:
        return await client.generate(GenerateRequest(**kw))


def tokens(r: Rollouts) -> list[list[list[int]]]:
    return [[s.token_ids.tolist() for s in group] for group in r.samples]


# ---- info, probes, auth --------------------------------------------------------------------------------------------

async def test_info_and_probes(tiny_model):
    app = rollout_app(GeneratorDouble(), tiny_model, RolloutLimits(max_n=8))
    async with running(app) as client:
        assert (await client.get("/healthz")).status_code == 200 and (await client.get("/readyz")).status_code == 200
        assert (await client.get("/v1/info")).status_code == 401
        info = (await client.get("/v1/info", headers=bearer(USER))).json()
    assert (info["backend"], info["vocab_size"], info["eos_token_ids"], info["weight_version"]) == ("double", 512,
                                                                                                    [0, 2], 0)
    assert info["limits"] == RolloutLimits(max_n=8).as_dict()


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Bearer {ADMIN}", f"Basic {USER}"])
async def test_generate_needs_the_user_key(tiny_model, header):
    double = GeneratorDouble()
    async with running(rollout_app(double, tiny_model)) as client:
        resp = await client.post("/v1/generate", json={"prompts": [[1, 2]], "max_tokens": 2},
                                 headers={"Authorization": header} if header else {})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert double.calls == []


async def test_a_generator_that_fails_to_load_is_reported(tiny_model):
    def load() -> Generator:
        raise OSError("disk gone")

    async with running(create_app(load, tiny_model)) as client:
        ready = await client.get("/readyz")
        refused = await client.post("/v1/generate", json={"prompts": [[1, 2]], "max_tokens": 2})
    assert ready.status_code == 503 and "OSError: disk gone" in ready.json()["error"]["message"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "load_failed"


# ---- generation ----------------------------------------------------------------------------------------------------

async def test_samples_carry_the_generators_tokens_logprobs_and_options(tiny_model):
    double = GeneratorDouble()
    app = rollout_app(double, tiny_model)
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44]]
    async with running(app):
        r = await generate(app, prompts=prompts, n=3, max_tokens=12, seed=1, temperature=0.7, top_p=0.9, top_k=50,
                           stop_token_ids=[77])
    assert [p.tolist() for p in r.prompt_ids] == prompts and r.weight_version == 0 and r.model == "generator-double"
    (got_prompts, options), = double.calls
    assert got_prompts == prompts
    assert (options.n, options.temperature, options.top_p, options.top_k, options.max_tokens, options.stop_token_ids,
            options.seed) == (3, 0.7, 0.9, 50, 12, (77,), 1)
    assert [len(g) for g in r.samples] == [3, 3]
    for prompt, group in zip(prompts, r.samples, strict=True):
        for s in group:
            ids = s.token_ids.tolist()
            assert 1 <= len(ids) <= 12 and len(s.logprobs) == len(ids)
            assert s.finish_reason == ("stop" if ids[-1] in (0, 2, 77) else "length")
            prev = [prompt[-1], *ids[:-1]]
            np.testing.assert_array_equal(s.logprobs, double.table[prev, ids])  # the sampler's raw log-probs


async def test_seed_reproduces_and_json_and_msgpack_agree(tiny_model):
    app = rollout_app(GeneratorDouble(), tiny_model)
    kw = dict(prompts=[[9, 10, 11]], n=2, max_tokens=10)
    async with running(app):
        a, b = await generate(app, seed=7, **kw), await generate(app, binary=False, seed=7, **kw)
        c = await generate(app, seed=8, **kw)
    assert tokens(a) == tokens(b) != tokens(c)
    for x, y in zip(a.samples[0], b.samples[0], strict=True):
        assert np.array_equal(x.logprobs, y.logprobs) and x.finish_reason == y.finish_reason


async def test_chat_messages_are_rendered_with_the_models_chat_template(tiny_model):
    from transformers import AutoTokenizer

    double = GeneratorDouble()
    app = rollout_app(double, tiny_model)
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    want = tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))["input_ids"]
    async with running(app):
        r = await generate(app, messages=[conv], max_tokens=3)
    assert r.prompt_ids[0].tolist() == want and double.calls[0][0] == [want]


INVALID = [
    ({"max_tokens": 4}, None),
    ({"prompts": [[1, 2]], "messages": [[{"role": "user", "content": "x"}]], "max_tokens": 4}, None),
    ({"prompts": [[1, 600]], "max_tokens": 4}, "prompts[0][1]"),
    ({"prompts": [[1, 2]], "max_tokens": 5000}, "prompts[0]"),
    ({"prompts": [[1, 2]], "max_tokens": 4, "n": 65}, "n"),
    ({"prompts": [[1, 2]], "max_tokens": 4, "temperature": -1}, "temperature"),
    ({"prompts": [[1, 2]], "max_tokens": 4, "temperature": 5e-324}, "temperature"),  # sampled NaN before
    ({"prompts": [[1, 2]], "max_tokens": 4, "top_p": 0}, "top_p"),
    ({"prompts": [[1, 2]], "max_tokens": 0}, "max_tokens"),
    ({"prompts": [[]], "max_tokens": 4}, "prompts[0]"),
    ({"messages": [[{"role": "robot", "content": "x"}]], "max_tokens": 4}, "messages[0][0].role"),
    ({"prompts": [[1, 2]], "max_tokens": 4, "stop_token_ids": [999]}, "stop_token_ids[0]"),
    ({"prompts": [[1, 2]], "max_tokens": 4, "images": ["aGk="]}, "images"),
]


@pytest.mark.parametrize(("body", "field"), INVALID)
async def test_invalid_generate_requests_name_the_field(tiny_model, body, field):
    double = GeneratorDouble()
    async with running(rollout_app(double, tiny_model), headers=bearer(USER)) as client:
        resp = await client.post("/v1/generate", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["field"] == field
    assert double.calls == []


async def test_client_raises_the_servers_api_error(tiny_model):
    app = rollout_app(GeneratorDouble(), tiny_model)
    async with running(app):
        with pytest.raises(ApiError) as exc:
            await generate(app, prompts=[[1, 999]], max_tokens=2)
    assert exc.value.status == 422 and exc.value.field == "prompts[0][1]"


# ---- limits --------------------------------------------------------------------------------------------------------

async def test_prompt_count_n_and_body_size_limits(tiny_model):
    limits = RolloutLimits(max_prompts=2, max_n=3, max_body_bytes=2000)
    async with running(rollout_app(GeneratorDouble(), tiny_model, limits), headers=bearer(USER)) as client:
        many = await client.post("/v1/generate", json={"prompts": [[1, 2]] * 3, "max_tokens": 2})
        big_n = await client.post("/v1/generate", json={"prompts": [[1, 2]], "max_tokens": 2, "n": 4})
        huge = await client.post("/v1/generate", json={"prompts": [[1] * 1000], "max_tokens": 2})
        fine = await client.post("/v1/generate", json={"prompts": [[1, 2]] * 2, "max_tokens": 2, "n": 3})
    assert many.status_code == 413 and many.json()["error"] == {
        "code": "batch_too_large", "message": "3 prompts; limit is 2", "field": "prompts"}
    assert big_n.status_code == 422 and big_n.json()["error"]["field"] == "n"
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    assert fine.status_code == 200


@pytest.mark.parametrize("form", ["prompts", "messages", "messages-escaped-keys"])
async def test_a_generate_body_over_its_budget_is_refused_before_it_is_parsed(tiny_model, form):
    """Forty prompts where two are allowed (the budget's slack is what one prompt may hold: up to 16 messages), each
    form, followed by garbage: 413 (counted), never the parser's 400. A body at the limit with braces, brackets and
    commas in its messages' text is served (strings are not counted)."""
    limits = RolloutLimits(max_prompts=2)
    one = {"prompts": b"[1, 2]", "messages": b'[{"role": "user", "content": "x"}]',
           "messages-escaped-keys": b'[{"r\\u006fle": "user", "c\\u006fntent": "x"}]'}[form]
    key = b"prompts" if form == "prompts" else b"messages"
    body = b'{"' + key + b'": [' + b", ".join([one] * 40) + b'], "max_tokens": 2, {not json'
    text = {"messages": [[{"role": "user", "content": "{[,]} " * 20}]] * 2, "max_tokens": 2}
    generator = GeneratorDouble()
    async with running(rollout_app(generator, tiny_model, limits), headers=bearer(USER)) as client:
        over = await client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
        fine = await client.post("/v1/generate", json=text)
    err = over.json()["error"]
    assert over.status_code == 413 and err["field"] == "prompts" and "counted before parsing" in err["message"]
    assert fine.status_code == 200


async def test_too_many_header_fields_get_431_before_any_route(tiny_model):
    limits = RolloutLimits(headers=HeaderLimits(max_headers=12))  # the client sends ~8 of its own
    async with running(rollout_app(GeneratorDouble(), tiny_model, limits), headers=bearer(USER)) as client:
        body = {"prompts": [[1, 2]], "max_tokens": 2}
        refused = await client.post("/v1/generate", json=body, headers={f"x-{i}": "1" for i in range(10)})
        fine = await client.post("/v1/generate", json=body)
    assert refused.status_code == 431 and refused.json()["error"]["code"] == "too_many_headers"
    assert fine.status_code == 200


async def test_the_work_of_one_request_is_bounded(tiny_model):
    """Each field within its limit, their product not: 3 prompts x n 4 x 10 tokens = 120 > 100 tokens to generate."""
    limits = RolloutLimits(max_request_tokens=100, max_prompt_tokens=10)
    double = GeneratorDouble()
    async with running(rollout_app(double, tiny_model, limits), headers=bearer(USER)) as client:
        much = await client.post("/v1/generate", json={"prompts": [[1, 2]] * 3, "n": 4, "max_tokens": 10})
        long = await client.post("/v1/generate", json={"prompts": [[1] * 6, [2] * 5], "max_tokens": 2})
        fine = await client.post("/v1/generate", json={"prompts": [[1, 2]] * 2, "n": 5, "max_tokens": 10})
        info = (await client.get("/v1/info")).json()
    assert much.status_code == 413 and much.json()["error"]["field"] == "max_tokens"
    message = much.json()["error"]["message"]
    assert "= 120 tokens" in message and "--max-request-tokens" in message
    assert long.status_code == 413 and long.json()["error"]["field"] == "prompts"
    assert fine.status_code == 200 and len(double.calls) == 1
    assert info["limits"]["max_request_tokens"] == 100 and info["limits"]["max_prompt_tokens"] == 10


async def test_a_chat_prompt_too_long_for_the_model_is_refused_before_it_is_tokenized(tiny_model):
    double = GeneratorDouble(max_length=64)  # 64 tokens hold at most 2048 characters
    async with running(rollout_app(double, tiny_model), headers=bearer(USER)) as client:
        resp = await client.post("/v1/generate", json={"messages": [[{"role": "user", "content": "x" * 3000}]],
                                                       "max_tokens": 2})
    assert resp.status_code == 413 and resp.json()["error"]["field"] == "messages[0]"
    assert double.calls == []


async def test_the_characters_of_all_messages_are_bounded_before_any_is_tokenized(tiny_model):
    limits = RolloutLimits(max_prompt_chars=1000)
    double = GeneratorDouble()
    app = rollout_app(double, tiny_model, limits)
    convs = [[{"role": "user", "content": "x" * 250}]] * 4  # exactly 1000 characters
    async with running(app, headers=bearer(USER)) as client:
        tokenizer = app.state.service.tokenizer = CountingTokenizer(app.state.service.tokenizer)
        over = await client.post("/v1/generate", json={"messages": [*convs, [{"role": "user", "content": "y"}]],
                                                       "max_tokens": 2})
        refused_calls = tokenizer.calls
        at = await client.post("/v1/generate", json={"messages": convs, "max_tokens": 2})
    assert over.status_code == 413 and over.json()["error"]["field"] == "messages"
    assert "1001 characters" in over.json()["error"]["message"] and refused_calls == 0
    assert at.status_code == 200 and tokenizer.calls == 4 and len(double.calls) == 1


async def test_chat_prompts_stop_tokenizing_once_their_tokens_pass_the_limit(tiny_model):
    """Many long conversations, each within the max length and all within the character limit: tokenizing stops at
    the first one that takes the running total past --max-prompt-tokens, not after all of them."""
    convs = [[{"role": "user", "content": f"{i} " + "long words " * 80}] for i in range(200)]
    app = rollout_app(GeneratorDouble(), tiny_model)
    async with running(app):
        tokenizer = app.state.service.tokenizer
        sizes = [len(tokenizer(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                               add_special_tokens=False)["input_ids"]) for c in convs[:3]]
    limit = sum(sizes)  # the first three conversations hold exactly the limit
    double = GeneratorDouble()
    app = rollout_app(double, tiny_model, RolloutLimits(max_prompt_tokens=limit))
    async with running(app, headers=bearer(USER)) as client:
        counting = app.state.service.tokenizer = CountingTokenizer(app.state.service.tokenizer)
        many = await client.post("/v1/generate", json={"messages": convs, "max_tokens": 2})
        refused_calls = counting.calls
        at = await client.post("/v1/generate", json={"messages": convs[:3], "max_tokens": 2})
    assert many.status_code == 413 and many.json()["error"]["field"] == "messages"
    assert refused_calls == 4  # the fourth conversation passed the limit: 196 were never tokenized
    assert at.status_code == 200 and [len(p) for p in double.calls[0][0]] == sizes


class CountingTokenizer:
    """The service's tokenizer, counting the texts it tokenizes."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)


async def test_greedy_with_several_samples_samples_once_and_copies(tiny_model):
    double = GeneratorDouble()
    app = rollout_app(double, tiny_model)
    async with running(app):
        r = await generate(app, prompts=[[5, 6, 7], [8, 9]], n=3, max_tokens=6, temperature=0)
    assert double.calls[0][1].n == 1
    assert [len(set(map(tuple, group))) for group in tokens(r)] == [1, 1] and [len(g) for g in r.samples] == [3, 3]


# ---- sampling in waves under a memory budget -----------------------------------------------------------------------

COST = RowCost(per_position=10, per_row=20)  # a row of width w sampling 3 tokens: (w + 3) x 10 + 20 bytes


def test_waves_pack_consecutive_rows_under_the_budget():
    # prompts of 2, 3 and 5 tokens, n 3: rows cost 70, 80 and 100 bytes at their own width
    assert plan_waves([2, 3, 5], 3, 3, COST, 10_000) == [[Segment(0, 0, 3), Segment(1, 0, 3), Segment(2, 0, 3)]]
    exact = plan_waves([2, 3, 5], 3, 3, COST, 210)  # three rows of 70 exactly fill a wave; width 3 makes rows 80
    assert exact == [[Segment(0, 0, 3)], [Segment(1, 0, 2)], [Segment(1, 2, 1), Segment(2, 0, 1)],
                     [Segment(2, 1, 2)]]
    assert plan_waves([2, 3, 5], 3, 3, COST, 209)[0] == [Segment(0, 0, 2)]  # a byte less: two rows
    for budget in (100, 150, 209, 210, 299, 300, 1000):
        waves = plan_waves([2, 3, 5], 3, 3, COST, budget)
        assert [row for wave in waves for row in wave_rows(wave)] == [(i, j) for i in range(3) for j in range(3)]
        for wave in waves:  # every wave within the budget, its rows padded to its longest prompt
            width = max([2, 3, 5][s.prompt] for s in wave)
            assert sum(s.count for s in wave) * COST.of(width, 3) <= budget


def test_a_row_over_the_budget_is_refused_naming_its_prompt():
    assert plan_waves([2, 5], 1, 3, COST, 100) == [[Segment(0, 0, 1)], [Segment(1, 0, 1)]]  # 100 bytes: exactly one
    with pytest.raises(ApiError) as exc:
        plan_waves([2, 5], 1, 3, COST, 99)
    assert (exc.value.status, exc.value.field) == (413, "prompts[1]")
    assert "--max-batch-memory-mb" in exc.value.message


async def test_a_row_no_wave_can_hold_is_refused_before_it_is_queued(tiny_model, hf_generator, monkeypatch):
    cost = hf_generator.info().row_cost
    longest = (MIB - cost.per_row) // cost.per_position - 8  # the prompt one row sampling 8 tokens in 1 MiB may hold
    calls, generate_rows = [], hf_generator.generate
    monkeypatch.setattr(hf_generator, "generate", lambda *args: calls.append(args[1]) or generate_rows(*args))
    app = rollout_app(hf_generator, tiny_model, RolloutLimits(max_batch_memory_mb=1))
    async with running(app, headers=bearer(USER)) as client:
        over = await client.post("/v1/generate", json={"prompts": [[5] * 4, [6] * (longest + 1)], "max_tokens": 8})
        refused_calls = len(calls)
        at = await client.post("/v1/generate", json={"prompts": [[5] * 4, [6] * longest], "max_tokens": 8})
    assert over.status_code == 413 and over.json()["error"]["field"] == "prompts[1]" and refused_calls == 0
    assert at.status_code == 200 and [options.batch_bytes for options in calls] == [MIB]


def test_hf_waves_sample_what_one_batch_samples(hf_generator):
    """Each row draws from its own stream, so a seeded request gives the same samples however it is split."""
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44, 45, 46], [9], [100, 101, 102, 103]]
    cost = hf_generator.info().row_cost
    two_rows = 2 * cost.of(7, 10)  # at most two rows a wave
    for kw in (dict(seed=3), dict(seed=4, temperature=0.7, top_p=0.9, top_k=50)):
        whole = SamplingOptions(n=3, max_tokens=10, **kw)
        split = replace(whole, batch_bytes=two_rows)
        assert len(plan_waves(list(map(len, prompts)), 3, 10, cost, two_rows)) == 6
        a, b = hf_generator.generate(prompts, whole), hf_generator.generate(prompts, split)
        assert [[s.token_ids.tolist() for s in g] for g in a] == [[s.token_ids.tolist() for s in g] for g in b]
        for x, y in zip((s for g in a for s in g), (s for g in b for s in g), strict=True):
            np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-4)  # float rounding of other batch shapes
            assert x.finish_reason == y.finish_reason
        assert len({tuple(s.token_ids) for g in a for s in g}) > 1


async def test_too_many_pending_requests_answer_429(tiny_model):
    double = GeneratorDouble(held=True)
    app = rollout_app(double, tiny_model, RolloutLimits(max_pending_requests=1))
    async with running(app, headers=bearer(USER)) as client:
        first = asyncio.create_task(client.post("/v1/generate", json={"prompts": [[1, 2]], "max_tokens": 2}))
        await asyncio.to_thread(double.gate.entered.wait, 10)
        refused = await client.post("/v1/generate", json={"prompts": [[3, 4]], "max_tokens": 2})
        double.gate.open()
        assert (await first).status_code == 200
        after = await client.post("/v1/generate", json={"prompts": [[3, 4]], "max_tokens": 2})
        metrics = (await client.get("/metrics")).text
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full" and after.status_code == 200
    assert "uniopd_pending_requests 0.0" in metrics


# ---- weights -------------------------------------------------------------------------------------------------------

async def post_weights(client, content: bytes | None = None, json: dict | None = None, key: str = ADMIN,
                       content_type: str = "application/octet-stream") -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {key}", **({"Content-Type": content_type} if content is not None else {})}
    resp = await client.post("/v1/weights", content=content, json=json, headers=headers)
    return resp.status_code, resp.json()


async def test_weight_updates_are_guarded_and_validated(tiny_model, weights_root):
    double = GeneratorDouble()
    tensors = load_file(tiny_model / "model.safetensors")
    name = "model.embed_tokens.weight"
    async with running(rollout_app(double, tiny_model, weights_root=weights_root)) as client:
        status, _ = await post_weights(client, save(tensors), key=USER)
        assert status == 401  # a user key is not an admin key
        status, body = await post_weights(client, b"not safetensors")
        assert status == 422 and body["error"]["code"] == "invalid_weights"
        renamed = {"model.nonexistent.weight": next(iter(tensors.values()))}
        assert (await post_weights(client, save(renamed)))[1]["error"]["field"] == "model.nonexistent.weight"
        status, body = await post_weights(client, save({name: torch.zeros(3, 3)}))
        assert status == 422 and body["error"]["field"] == name and "(3, 3)" in body["error"]["message"]
        status, body = await post_weights(client, save({name: tensors[name].to(torch.int32)}))
        assert status == 422 and body["error"]["field"] == name and "float" in body["error"]["message"]
        status, body = await post_weights(client, save({}))
        assert status == 422 and body["error"]["code"] == "invalid_weights"
        diverged = {**tensors, name: tensors[name].clone().index_fill_(0, torch.tensor([3]), float("nan"))}
        status, body = await post_weights(client, save(diverged))
        assert status == 422 and body["error"]["field"] == name and "NaN" in body["error"]["message"]
        status, body = await post_weights(client, save({**tensors, name: torch.full_like(tensors[name], float("inf"))}))
        assert status == 422 and body["error"]["field"] == name
        assert (await post_weights(client, json={"path": "original\x00.safetensors"}))[1]["error"]["field"] == "path"
        outside = weights_root.parent / f"{weights_root.name}-outside"
        outside.mkdir()
        shutil.copy(weights_root / "other.safetensors", outside / "model.safetensors")
        (weights_root / "linked").mkdir()
        (weights_root / "linked" / "model.safetensors").symlink_to(outside / "model.safetensors")
        status, body = await post_weights(client, json={"path": "linked"})
        assert status == 422 and body["error"]["field"] == "path" and "outside" in body["error"]["message"]
        assert (await post_weights(client, json={"path": "../../etc/passwd"}))[1]["error"]["field"] == "path"
        assert (await post_weights(client, json={"path": "missing.safetensors"}))[0] == 422
        assert (await post_weights(client, b"x", content_type="text/plain"))[0] == 415
        info = (await client.get("/v1/info", headers=bearer(USER))).json()
    assert info["weight_version"] == 0 and double.loaded == []  # nothing was applied


async def test_weights_are_disabled_without_admin_keys_and_paths_without_a_root(tiny_model):
    async with running(rollout_app(GeneratorDouble(), tiny_model, admin=False)) as client:
        resp = await client.post("/v1/weights", json={"path": "x"})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"
    async with running(rollout_app(GeneratorDouble(), tiny_model)) as client:
        status, body = await post_weights(client, json={"path": "original.safetensors"})
    assert status == 400 and body["error"]["field"] == "path"


async def test_weight_pushes_change_the_version_and_the_outputs(tiny_model, other_model, weights_root):
    double = GeneratorDouble()
    app = rollout_app(double, tiny_model, weights_root=weights_root)
    greedy = dict(prompts=[[5, 6, 7, 8]], max_tokens=8, temperature=0)
    async with running(app) as client, client_of(app) as rollout:
        before = await generate(app, **greedy)
        pushed = await rollout.push_weights((other_model / "model.safetensors").read_bytes())
        after_push = await generate(app, **greedy)
        status, restored = await post_weights(client, json={"path": "original.safetensors"})
        after_restore = await generate(app, **greedy)
        again = await rollout.push_weights((weights_root / "other.safetensors").read_bytes())
        after_again = await generate(app, **greedy)
        metrics = (await client.get("/metrics")).text
    assert status == 200 and (pushed.weight_version, restored["weight_version"], again.weight_version) == (1, 2, 3)
    assert [r.weight_version for r in (before, after_push, after_restore, after_again)] == [0, 1, 2, 3]
    assert tokens(after_push) != tokens(after_restore) and tokens(after_push) == tokens(after_again)
    shapes = {k: tuple(v.shape) for k, v in load_file(tiny_model / "model.safetensors").items()}
    assert double.loaded == [shapes] * 3 and pushed.tensors == len(shapes)
    assert "uniopd_weight_version 3.0" in metrics and "uniopd_weight_loads_total 3.0" in metrics


async def test_generation_in_flight_finishes_on_the_old_weights(tiny_model, other_model, monkeypatch):
    double = GeneratorDouble(held=True)
    app = rollout_app(double, tiny_model)
    service, submitted = app.state.service, asyncio.Event()
    load_weights = service.load_weights

    async def load_weights_seen(tensors: dict, size: int):
        submitted.set()  # the checked weights go to the worker thread right after this, before any other task runs
        return await load_weights(tensors, size)

    monkeypatch.setattr(service, "load_weights", load_weights_seen)
    async with running(app), client_of(app) as rollout:
        long = asyncio.create_task(rollout.generate(GenerateRequest(prompts=[[1, 2, 3]] * 8, n=4, max_tokens=20)))
        await asyncio.to_thread(double.gate.entered.wait, 10)
        push = asyncio.create_task(rollout.push_weights((other_model / "model.safetensors").read_bytes()))
        await asyncio.wait_for(submitted.wait(), 10)
        await asyncio.sleep(0.05)
        assert not push.done() and double.loaded == []  # the push waits behind the generation on the worker thread
        double.gate.open()
        rollouts, pushed = await long, await push
    assert rollouts.weight_version == 0 and pushed.weight_version == 1 and len(double.loaded) == 1


# ---- the real transformers backend, in-process ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_generator(tiny_model):
    from services.rollout_server.backends.hf import HFGenerator

    return HFGenerator(tiny_model, dtype="float32", device="cpu")


async def test_hf_samples_carry_teacher_forced_logprobs_and_greedy_matches_transformers(hf_generator, tiny_model,
                                                                                       reference):
    app = rollout_app(hf_generator, tiny_model)
    prompt = [5, 6, 7, 8]
    async with running(app):
        sampled = await generate(app, prompts=[prompt], n=3, max_tokens=10, seed=1)
        warped = await generate(app, prompts=[prompt], n=3, max_tokens=10, seed=2, temperature=0.7, top_p=0.9,
                                top_k=50)
        greedy = await generate(app, prompts=[prompt], max_tokens=8, temperature=0)
    for s in sampled.samples[0] + warped.samples[0] + greedy.samples[0]:  # raw log-probs, whatever the warpers
        full = prompt + s.token_ids.tolist()
        np.testing.assert_allclose(s.logprobs, reference.span(full, len(prompt)), atol=1e-4)
    with torch.inference_mode():
        want = reference.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)[0, len(prompt):].tolist()
    assert greedy.samples[0][0].token_ids.tolist() == want[: len(greedy.samples[0][0].token_ids)]
