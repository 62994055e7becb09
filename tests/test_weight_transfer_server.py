"""Weights through vLLM's weight-transfer engine to a real rollout server process (vLLM backend, --weight-transfer
gloo): the trainer's side (trainer.weight_sync: vLLM's trainer factory, the gloo engine, the HTTP control plane)
pushes a model, and the server then samples exactly as after a safetensors push of the same weights; refusals."""

from __future__ import annotations

import asyncio
import shutil
import time

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from proto.client import RolloutClient
from proto.errors import ApiError
from proto.rollout import GenerateRequest
from tests.conftest import HAS_VLLM
from trainer.config import RolloutConfig
from trainer.weight_sync import EngineSync
from uniopd.launch import start_rollout
from uniopd.tiny_models import build_tiny_model

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")]

ADMIN = "admin-secret-1"
USER = "user-key-1"
PROMPT = [5, 6, 7, 8]
SAMPLED = GenerateRequest(prompts=[PROMPT, [9, 10]], n=3, max_tokens=12, temperature=1.0, seed=7)
GREEDY = GenerateRequest(prompts=[PROMPT], max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-s5", "qwen3", seed=5)


@pytest.fixture(scope="module")
def server(tiny_model, other_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights-root")
    shutil.copy(tiny_model / "model.safetensors", root / "original.safetensors")
    shutil.copy(other_model / "model.safetensors", root / "other.safetensors")
    keys = tmp_path_factory.mktemp("keys")
    (keys / "api").write_text(USER)
    (keys / "admin").write_text(ADMIN)
    args = ["--api-keys", str(keys / "api"), "--admin-keys", str(keys / "admin"), "--weights-root", str(root),
            "--weight-transfer", "gloo"]
    with start_rollout(tiny_model, "vllm", args, log_dir=tmp_path_factory.mktemp("log")) as s:
        yield s


def generate(server, request: GenerateRequest):
    async def go():
        async with RolloutClient(server.url, api_key=USER) as client:
            return await client.generate(request)

    return asyncio.run(go())


def push_path(server, path: str) -> int:
    resp = httpx.post(server.url + "/v1/weights", json={"path": path}, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 200, resp.text
    return resp.json()["weight_version"]


def engine_sync(server, model) -> EngineSync:
    sync = EngineSync(RolloutConfig(url=server.url, weight_sync="gloo", timeout_s=60), model, rank=0,
                      admin_key=ADMIN)
    sync.connect()
    return sync


def samples(rollouts) -> list:
    return [[(s.token_ids.tolist(), s.logprobs) for s in group] for group in rollouts.samples]


def assert_same_samples(a, b) -> None:
    for group_a, group_b in zip(samples(a), samples(b), strict=True):
        for (tokens_a, lp_a), (tokens_b, lp_b) in zip(group_a, group_b, strict=True):
            assert tokens_a == tokens_b
            np.testing.assert_array_equal(lp_a, lp_b)  # bit for bit: the same weights, loaded the same way


def test_a_transfer_samples_exactly_like_a_push_of_the_same_weights(server, tiny_model, other_model):
    before = generate(server, GREEDY)
    student = AutoModelForCausalLM.from_pretrained(other_model, dtype=torch.float32)
    sync = engine_sync(server, student)
    try:
        loaded = sync.push()
    finally:
        sync.close()
    assert loaded.weight_version == before.weight_version + 1
    assert loaded.tensors == len(dict(student.named_parameters()))
    transferred, greedy = generate(server, SAMPLED), generate(server, GREEDY)
    assert transferred.weight_version == greedy.weight_version == loaded.weight_version
    expected = student.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(PROMPT):].tolist()
    assert greedy.samples[0][0].token_ids.tolist() == expected != before.samples[0][0].token_ids.tolist()

    push_path(server, "original.safetensors")
    assert generate(server, GREEDY).samples[0][0].token_ids.tolist() == before.samples[0][0].token_ids.tolist()
    version = push_path(server, "other.safetensors")
    pushed = generate(server, SAMPLED)
    assert pushed.weight_version == version
    assert_same_samples(transferred, pushed)
    push_path(server, "original.safetensors")


def test_a_student_the_server_does_not_serve_is_refused_before_data_moves(server, tmp_path):
    before = generate(server, GREEDY)
    narrow = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "narrow", "qwen3", hidden=64))
    sync = engine_sync(server, narrow)
    started = time.monotonic()
    try:
        with pytest.raises(ApiError) as exc:
            sync.push()
    finally:
        sync.close()
    assert time.monotonic() - started < 30  # the refusal, not a broadcast waiting for its 60 s timeout
    assert exc.value.status == 422 and exc.value.field == "update_info.shapes[0]"
    assert "model.embed_tokens.weight" in exc.value.message
    after = generate(server, GREEDY)  # the round closed untouched: the model is whole, its version unchanged
    assert after.weight_version == before.weight_version
    assert after.samples[0][0].token_ids.tolist() == before.samples[0][0].token_ids.tolist()


def test_the_control_plane_needs_the_admin_key_and_checks_its_fields(server):
    url = server.url + "/v1/weights/transfer/"
    init = {"init_info": {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2}}
    assert httpx.post(url + "init", json=init).status_code == 401
    assert httpx.post(url + "start", headers={"Authorization": f"Bearer {USER}"}).status_code == 401
    admin = {"Authorization": f"Bearer {ADMIN}"}
    bad = httpx.post(url + "init", json={"init_info": {**init["init_info"], "world_size": 5}}, headers=admin)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "init_info.world_size"
    port = httpx.post(url + "init", json={"init_info": {**init["init_info"], "master_port": 0}}, headers=admin)
    assert port.status_code == 422 and port.json()["error"]["field"] == "init_info.master_port"


def test_a_round_that_breaks_off_refuses_sampling_until_a_complete_update(server, tiny_model, other_model):
    """The trainer dies after three tensors: the server's receive times out, vLLM's layerwise reload is finalized
    (the model can sample again), generation answers 503 while the weights are partial, and a new group and a full
    transfer bring it back."""
    from vllm.distributed.weight_transfer import ModuleSource

    class BreaksOff(ModuleSource):
        def __iter__(self):
            for i, item in enumerate(super().__iter__()):
                if i == 3:
                    raise RuntimeError("the trainer died")
                yield item

    before = generate(server, GREEDY)
    student = AutoModelForCausalLM.from_pretrained(other_model, dtype=torch.float32)
    sync = EngineSync(RolloutConfig(url=server.url, weight_sync="gloo", timeout_s=5), student, rank=0,
                      admin_key=ADMIN)
    sync.source = BreaksOff(student)
    sync.connect()
    with pytest.raises(RuntimeError, match="the trainer died"):
        sync.push()
    sync.close()
    deadline = time.monotonic() + 60
    while (resp := httpx.post(server.url + "/v1/generate", json=GREEDY.model_dump(exclude_none=True),
                              headers={"Authorization": f"Bearer {USER}"}, timeout=60)).status_code == 200:
        assert time.monotonic() < deadline, "the broken round never ended"
        time.sleep(0.5)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "weights_incomplete"
    assert "receiving failed" in resp.json()["error"]["message"]

    sync = engine_sync(server, AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    try:
        loaded = sync.push()
    finally:
        sync.close()
    after = generate(server, GREEDY)
    assert after.weight_version == loaded.weight_version
    assert after.samples[0][0].token_ids.tolist() == before.samples[0][0].token_ids.tolist()
