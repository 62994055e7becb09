"""Generator backends, imported lazily so a machine without vLLM can still run the transformers backend."""

from __future__ import annotations

from pathlib import Path

from services.rollout_server.generator import Generator

BACKENDS = ("hf", "vllm")


def load_generator(backend: str, model_dir: str | Path, dtype: str, max_length: int | None,
                   device: str = "auto") -> Generator:
    if backend == "hf":
        from services.rollout_server.backends.hf import HFGenerator

        return HFGenerator(model_dir, dtype=dtype, device=device, max_length=max_length)
    if backend == "vllm":
        from services.rollout_server.backends.vllm import VLLMGenerator

        return VLLMGenerator(model_dir, dtype=dtype, max_length=max_length)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
