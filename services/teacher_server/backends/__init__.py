"""Scorer backends, imported lazily so a machine without vLLM can still run the transformers backend."""

from __future__ import annotations

from pathlib import Path

from services.teacher_server.scorer import Scorer

BACKENDS = ("hf", "vllm")


def load_scorer(backend: str, model_dir: str | Path, dtype: str, max_length: int | None, max_top_k: int,
                device: str = "auto") -> Scorer:
    if backend == "hf":
        from services.teacher_server.backends.hf import HFScorer

        return HFScorer(model_dir, dtype=dtype, device=device, max_length=max_length, max_top_k=max_top_k)
    if backend == "vllm":
        from services.teacher_server.backends.vllm import VLLMScorer

        return VLLMScorer(model_dir, dtype=dtype, max_length=max_length, max_top_k=max_top_k)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
