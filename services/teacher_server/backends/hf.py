"""transformers backend: batched, right-padded prefill; logits only for response positions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from proto.codec import ScoredSpan
from proto.schemas import ScoreItem
from services.common.models import describe, load_hf_model, max_positions
from services.common.multimodal import Vision, is_multimodal, on_model
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
                 max_length: int | None = None, max_top_k: int = 20, forward_tokens: int = 16384) -> None:
        self.model = load_hf_model(model_dir, dtype, device)
        self.device = self.model.device
        self.vision = Vision(model_dir) if is_multimodal(model_dir) else None
        limit = max_positions(self.model)
        vocab = self.model.get_output_embeddings().weight.shape[0]
        base = describe(model_dir, "hf", dtype, vocab, min(max_length or limit, limit))
        self._info = ScorerInfo(**vars(base), max_top_k=max_top_k)
        self.forward_tokens = forward_tokens

    def info(self) -> ScorerInfo:
        return self._info

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
        # response positions count from the end: image expansion only lengthens the prompt
        starts = [len(s) - (len(it.input_ids) - it.response_start) for s, it in zip(seqs, items, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(items), width), dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        first = min(starts) - 1
        keep = torch.arange(first, width - 1, device=self.device)
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), logits_to_keep=keep,
                            **on_model(pixels, self.model)).logits.float()
        lse = torch.logsumexp(logits, dim=-1)
        targets = ids[:, first + 1 :].to(self.device)
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
        spans = []
        for row, (it, s, start) in enumerate(zip(items, seqs, starts, strict=True)):
            lo, hi = start - 1 - first, len(s) - 1 - first
            span = ScoredSpan(picked[row, lo:hi].cpu().numpy())
            if it.top_k:
                vals, idx = logits[row, lo:hi].topk(it.top_k, dim=-1)
                span.top_k_ids = idx.to(torch.int32).cpu().numpy()
                span.top_k_logprobs = (vals - lse[row, lo:hi, None]).cpu().numpy()
            spans.append(span)
        return spans
