"""The rollout app in-process (create_app over a GeneratorDouble, or the real HFGenerator on the tiny model): info,
probes, generation in JSON and msgpack, chat prompts, request limits, auth with user and admin keys, weight-push
validation and the weight version.

The app loads the tiny model's tokenizer (chat prompts) and parameter shapes (weight checks) from its directory, so the
weight pushes below are the tiny model's real safetensors. Real server processes, both backends: the e2e tier's
test_rollout_server.py."""

from __future__ import annotations

import asyncio
import shutil
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
from services.rollout_server.generator import Generator
from services.rollout_server.limits import RolloutLimits
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
                      weights_root=weights_root)


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
