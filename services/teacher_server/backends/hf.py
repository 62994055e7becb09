"""transformers backend: length-sorted groups under a padded-token budget, each one prefill (modeling.logprobs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from modeling.logprobs import candidate_logprobs, prefill_responses
from proto.codec import ScoredSpan
from proto.schemas import ScoreItem
from services.common.models import serve_hf
from services.teacher_server.scorer import ScorerInfo


def pack_by_padded_tokens(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Group indices (sorted by length) so each group's padded size, rows x longest, stays within budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[i] <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class HFScorer:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "auto",
                 max_length: int | None = None, max_top_k: int = 128, forward_tokens: int = 16384) -> None:
        self.model, self.vision, base = serve_hf(model_dir, dtype, device, max_length)
        self._info = ScorerInfo(**vars(base), max_top_k=max_top_k)
        self.forward_tokens = forward_tokens

    def info(self) -> ScorerInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return self.vision.image_positions(size)

    @torch.inference_mode()
    def score(self, items: Sequence[ScoreItem], images: Sequence[Sequence] | None = None) -> list[ScoredSpan]:
        seqs, pixels = [it.input_ids for it in items], {}
        if images is not None:
            seqs, pixels = self.vision.expand(seqs, images)
        bounds = np.cumsum([0] + [len(x) for x in images]) if images is not None else None
        out: list[ScoredSpan | None] = [None] * len(items)
        for group in pack_by_padded_tokens([len(s) for s in seqs], self.forward_tokens):
            shown = [j for i in group for j in range(bounds[i], bounds[i + 1])] if pixels else []
            # image tensors hold one row per image, in item order
            group_pixels = {k: v[torch.tensor(shown)] for k, v in pixels.items()} if shown else {}
            spans = self._score_group([items[i] for i in group], [seqs[i] for i in group], group_pixels)
            for i, span in zip(group, spans, strict=True):
                out[i] = span
        return out  # type: ignore[return-value]

    def _score_group(self, items: list[ScoreItem], seqs: list[Sequence[int]], pixels: dict) -> list[ScoredSpan]:
        lengths = [len(it.input_ids) - it.response_start for it in items]
        scored = prefill_responses(self.model, seqs, lengths, pixels)
        logprobs = scored.logprobs.cpu().numpy()
        spans = []
        for row, (it, n) in enumerate(zip(items, lengths, strict=True)):
            span = ScoredSpan(logprobs[row, :n])
            if it.top_k:
                ids, top = scored.top_k(row, it.top_k)
                span.top_k_ids = ids.to(torch.int32).cpu().numpy()
                span.top_k_logprobs = top.cpu().numpy()
            if it.distribution:
                span.distribution = scored.distribution(row).cpu().numpy()
            if it.ranks or it.candidates is not None:
                dist = scored.distribution(row)
            if it.ranks:
                picked = dist.gather(-1, torch.tensor(it.input_ids[it.response_start:], device=dist.device)[:, None])
                span.ranks = ((dist > picked).sum(-1) + 1).to(torch.int32).cpu().numpy()
            if it.candidates is not None:
                cand, tail = candidate_logprobs(dist, torch.tensor(it.candidates, device=dist.device))
                span.candidate_logprobs, span.tail_logprobs = cand.cpu().numpy(), tail.cpu().numpy()
            spans.append(span)
        return spans
