"""What both backends read from a model directory to describe themselves."""

from __future__ import annotations

from pathlib import Path

from proto.fingerprint import model_revision, tokenizer_fingerprint
from services.teacher_server.scorer import ScorerInfo


def describe(model_dir: str | Path, backend: str, dtype: str, vocab_size: int, max_length: int,
             max_top_k: int) -> ScorerInfo:
    from transformers import AutoTokenizer

    root = Path(model_dir)
    return ScorerInfo(
        model=root.resolve().name,
        revision=model_revision(root),
        tokenizer_fingerprint=tokenizer_fingerprint(AutoTokenizer.from_pretrained(root)),
        vocab_size=vocab_size,
        max_length=max_length,
        max_top_k=max_top_k,
        dtype=dtype,
        backend=backend,
    )
