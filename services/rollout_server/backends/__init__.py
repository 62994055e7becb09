"""Generator backends, imported lazily so a machine without vLLM can still run the transformers backend."""

from __future__ import annotations

from pathlib import Path

from services.rollout_server.generator import Generator

BACKENDS = ("hf", "vllm")
WEIGHT_TRANSFER_BACKENDS = ("gloo", "nccl")  # gloo: modeling.weight_transfer (CPU); nccl: vLLM's own (GPU)


def load_generator(backend: str, model_dir: str | Path, dtype: str, max_length: int | None,
                   device: str = "auto", weight_transfer: str | None = None) -> Generator:
    if weight_transfer and backend != "vllm":
        raise ValueError(f"weight_transfer {weight_transfer!r}: the weight-transfer engines are vLLM's, and the "
                         f"backend is {backend!r}")
    if backend == "hf":
        from services.rollout_server.backends.hf import HFGenerator

        return HFGenerator(model_dir, dtype=dtype, device=device, max_length=max_length)
    if backend == "vllm":
        from services.rollout_server.backends.vllm import VLLMGenerator

        return VLLMGenerator(model_dir, dtype=dtype, max_length=max_length, weight_transfer=weight_transfer)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
