"""transformers backend: length-sorted groups under a padded-token budget, each one prefill (modeling.logprobs);
items that share a prompt (an OPD group's samples) compute it once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from modeling.logprobs import ResponseLogprobs, candidate_logprobs, prefill_responses, prefill_shared_prompts
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


def shared_prompt_groups(items: Sequence[ScoreItem]) -> list[list[int]]:
    """Indices of items whose prompts (the tokens before response_start) are identical, for prompts of 2 tokens or
    more that at least two items share; every other item is left out."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, it in enumerate(items):
        if it.response_start >= 2:
            by_prompt.setdefault(it.prompt_key, []).append(i)
    return [idx for idx in by_prompt.values() if len(idx) > 1]


class HFScorer:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "auto",
                 max_length: int | None = None, max_top_k: int = 128, forward_tokens: int = 16384,
                 share_prompts: bool = True) -> None:
        self.model, self.vision, base = serve_hf(model_dir, dtype, device, max_length)
        self._info = ScorerInfo(**vars(base), max_top_k=max_top_k)
        self.forward_tokens = forward_tokens
        self.share_prompts = share_prompts

    def info(self) -> ScorerInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return self.vision.image_positions(size)

    @torch.inference_mode()
    def score(self, items: Sequence[ScoreItem], images: Sequence[Sequence] | None = None) -> list[ScoredSpan]:
        out: list[ScoredSpan | None] = [None] * len(items)
        rest = range(len(items))
        if self.share_prompts and images is None:
            shared = self._score_shared(items, out)
            rest = [i for i in rest if i not in shared]
        seqs, pixels = [items[i].input_ids for i in rest], {}
        if images is not None:
            seqs, pixels = self.vision.expand(seqs, images)
        bounds = np.cumsum([0] + [len(x) for x in images]) if images is not None else None
        for group in pack_by_padded_tokens([len(s) for s in seqs], self.forward_tokens):
            shown = [j for i in group for j in range(bounds[i], bounds[i + 1])] if pixels else []
            # image tensors hold one row per image, in item order
            group_pixels = {k: v[torch.tensor(shown)] for k, v in pixels.items()} if shown else {}
            chosen = [items[rest[i]] for i in group]
            scored = prefill_responses(self.model, [seqs[i] for i in group], [it.response_length for it in chosen],
                                       group_pixels)
            for i, span in zip(group, self._spans(chosen, scored), strict=True):
                out[rest[i]] = span
        return out  # type: ignore[return-value]

    def _score_shared(self, items: Sequence[ScoreItem], out: list[ScoredSpan | None]) -> set[int]:
        """Score the items that share a prompt, one prompt pass per prompt, packing prompts (longest prompt and
        response of a pack, over its prompts and rows) under the token budget; returns the indices it scored."""
        groups = sorted(shared_prompt_groups(items), key=lambda idx: items[idx[0]].response_start)
        packs: list[list[list[int]]] = []
        for idx in groups:
            trial = [*packs[-1], idx] if packs else [idx]
            rows = [i for g in trial for i in g]
            cost = (len(trial) * max(items[g[0]].response_start for g in trial)
                    + len(rows) * max(items[i].response_length for i in rows))
            if packs and cost <= self.forward_tokens:
                packs[-1] = trial
            else:
                packs.append([idx])
        done: set[int] = set()
        for pack in packs:
            rows = [i for g in pack for i in g]
            chosen = [items[i] for i in rows]
            scored = prefill_shared_prompts(
                self.model, [items[g[0]].input_ids[:items[g[0]].response_start] for g in pack],
                [it.input_ids[it.response_start:] for it in chosen], [n for n, g in enumerate(pack) for _ in g])
            if scored is None:  # the model's cache cannot be shared: score everything unshared
                self.share_prompts = False
                return done
            for i, span in zip(rows, self._spans(chosen, scored), strict=True):
                out[i] = span
            done.update(rows)
        return done

    @staticmethod
    def _spans(items: list[ScoreItem], scored: ResponseLogprobs) -> list[ScoredSpan]:
        logprobs = scored.logprobs.cpu().numpy()
        spans = []
        for row, (it, n) in enumerate(zip(items, scored.lengths, strict=True)):
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
