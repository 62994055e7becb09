"""The embedded demo: build a tiny teacher, serve it as a real process, score a chat rollout over HTTP.

Replaced by the full distillation demo once the trainer lands.
"""

from __future__ import annotations

from pathlib import Path

from proto.client import TeacherClient
from proto.schemas import ScoreItem
from uniopd.launch import start_teacher
from uniopd.tiny_models import build_tiny_model


def ensure_tiny_model(cache: Path, arch: str = "qwen3", seed: int = 0) -> Path:
    path = cache / "models" / f"tiny-{arch}-s{seed}"
    if not (path / "model.safetensors").exists():
        build_tiny_model(path, arch, seed)
    return path


async def run_demo(cache: Path, backend: str = "hf") -> None:
    from transformers import AutoTokenizer

    model = ensure_tiny_model(cache)
    tok = AutoTokenizer.from_pretrained(model)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True,
                                     tokenize=False)
    prompt_ids = tok(prompt)["input_ids"]
    response_ids = tok("12 + 30 = 42. The answer is 42.<|im_end|>")["input_ids"]
    item = ScoreItem(input_ids=prompt_ids + response_ids, response_start=len(prompt_ids), top_k=3)
    print(f"teacher model: {model}  backend: {backend}")
    with start_teacher(model, backend, ["--domain", "math"]) as server:
        async with TeacherClient(server.url, binary=False) as as_json, TeacherClient(server.url) as as_msgpack:
            info = await as_json.info()
            print(f"served at {server.url}; fingerprint {info.fingerprint.digest[:16]}, vocab {info.vocab_size}")
            _, (json_span,) = await as_json.score([item])
            _, (bin_span,) = await as_msgpack.score([item])
    print(f"{'token':>14} {'teacher logprob':>16}   top-3 ids")
    for j, lp in enumerate(bin_span.logprobs):
        token = tok.convert_ids_to_tokens(response_ids[j])
        print(f"{token!r:>14} {lp:16.4f}   {bin_span.top_k_ids[j].tolist()}")
    same = (json_span.logprobs == bin_span.logprobs).all()
    print(f"JSON and msgpack scores identical: {bool(same)}; "
          f"bytes on the wire: JSON {as_json.bytes_received}, msgpack {as_msgpack.bytes_received}")
