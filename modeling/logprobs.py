"""The one log-prob kernel: a right-padded prefill, logits only at response positions, each response token's
log-prob gathered. The teacher's scorer and the trainer's student both call it, so the two log-probs whose difference
is OPD's advantage come from the same arithmetic."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from modeling.multimodal import on_model


@dataclass
class ResponseLogprobs:
    """Every response token's log-prob, and the logits of the response positions, which top-k needs.

    `logprobs[i, t]` is log p(token t of response i | everything before it), float32, each row right-padded with 0 to
    the longest response; differentiable when the forward pass ran with grad enabled.
    """

    logprobs: torch.Tensor  # (rows, longest response)
    lengths: list[int]  # response tokens per row
    logits: torch.Tensor  # (rows, kept positions, vocab), float32
    lse: torch.Tensor  # (rows, kept positions): log of each kept position's softmax normaliser
    offsets: list[int]  # the kept position that predicts each row's first response token

    def _span(self, row: int) -> slice:
        return slice(self.offsets[row], self.offsets[row] + self.lengths[row])

    def top_k(self, row: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's k most likely tokens at each response position, best first: their ids and log-probs."""
        values, ids = self.logits[row, self._span(row)].topk(k, dim=-1)
        return ids, values - self.lse[row, self._span(row), None]

    def distribution(self, row: int) -> torch.Tensor:
        """A row's (response length, vocab) log-distribution at each response position."""
        return self.logits[row, self._span(row)] - self.lse[row, self._span(row), None]

    def distributions(self) -> torch.Tensor:
        """(rows, longest response, vocab) log-distributions, right-padded with 0 like `logprobs`."""
        out = self.logits.new_zeros((len(self.lengths), self.logprobs.shape[1], self.logits.shape[-1]))
        for row, n in enumerate(self.lengths):
            out[row, :n] = self.distribution(row)
        return out


def candidate_logprobs(distribution: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of given candidates at each position, and the log of the mass outside them (the tail bucket).

    `distribution` is (..., vocab) log-probs, `candidates` (..., k) distinct ids per position, or (1, k) shared by all
    positions. The tail is a log-sum-exp over the other tokens, not log(1 - sum), so it stays exact when the
    candidates hold nearly all the mass; it is -inf when they cover the vocabulary. Differentiable through
    `distribution`.
    """
    candidates = candidates.expand(*distribution.shape[:-1], candidates.shape[-1])
    picked = distribution.gather(-1, candidates)
    rest = distribution.scatter(-1, candidates, float("-inf"))
    return picked, torch.logsumexp(rest, dim=-1)


def right_padded(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, longest) token ids padded with 0 on the right, and the attention mask that marks the real ones."""
    ids = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
    return ids, mask


def prefill_responses(model, seqs: Sequence[Sequence[int]], response_lengths: Sequence[int],
                      pixels: dict | None = None) -> ResponseLogprobs:
    """One forward pass over `seqs`, right-padded, each ending in a response of `response_lengths[i]` tokens.

    Responses are counted from the end of each sequence, where image expansion (which only lengthens the prompt)
    cannot shift them; `pixels` are the image tensors of already expanded sequences. Logits are computed only from
    the batch's first response position on (`logits_to_keep`), in float32 whatever the model's dtype.
    """
    device = next(model.parameters()).device  # also right for a wrapped (DDP) model, which has no .device
    ids, mask = right_padded(seqs)
    width = ids.shape[1]
    starts = [len(s) - n for s, n in zip(seqs, response_lengths, strict=True)]
    first = min(starts) - 1  # the position whose logits predict the batch's earliest response token
    keep = torch.arange(first, width - 1, device=device)
    # no KV cache: nothing reads it, and under activation checkpointing (FSDP2's) every recomputed layer would append
    # to it again, doubling the keys its attention mask is sized for
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep, use_cache=False,
                   **on_model(pixels or {}, model)).logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, ids[:, first + 1:].to(device).unsqueeze(-1)).squeeze(-1) - lse
    offsets = [start - 1 - first for start in starts]
    steps = torch.arange(max(response_lengths), device=device)
    index = (torch.tensor(offsets, device=device)[:, None] + steps).clamp(max=picked.shape[1] - 1)
    inside = steps < torch.tensor(list(response_lengths), device=device)[:, None]
    logprobs = torch.where(inside, picked.gather(1, index), 0.0)
    return ResponseLogprobs(logprobs, list(response_lengths), logits, lse, offsets)


def prefill_shared_prompts(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                           prompt_of: Sequence[int]) -> ResponseLogprobs | None:
    """`prefill_responses` for rows that share prompts: each prompt is computed once and its keys and values are
    reused by every response row of it (`prompt_of[row]` indexes `prompts`).

    Two passes: the prompts but their last token (right-padded, caching keys and values), then per row the prompt's
    last token and the response but its last token, attending to its prompt's cached positions. The second pass's
    logits are exactly the ones that predict the response tokens, so every row starts at offset 0. Returns None when
    the model's cache is not plain full attention (sliding windows, recurrent state), where rows cannot simply be
    copied from a padded prompt's cache; the caller then scores the rows unshared.
    """
    from transformers.cache_utils import DynamicLayer

    if min(len(p) for p in prompts) < 2:
        raise ValueError("a shared prompt needs at least 2 tokens (one to cache, one to start the responses)")
    device = next(model.parameters()).device
    heads = [p[:-1] for p in prompts]
    ids, head_mask = right_padded(heads)
    cache = model(input_ids=ids.to(device), attention_mask=head_mask.to(device), use_cache=True,
                  logits_to_keep=1).past_key_values
    if any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None
    group = torch.tensor(list(prompt_of), device=device)
    cache.reorder_cache(group)
    lengths = [len(r) for r in responses]
    longest = max(lengths)
    tail = torch.zeros((len(responses), longest), dtype=torch.long)  # [last prompt token, response[:-1]]
    targets = torch.zeros_like(tail)
    tail_mask = torch.zeros_like(tail)
    for row, (r, g) in enumerate(zip(responses, prompt_of, strict=True)):
        tail[row, 0] = prompts[g][-1]
        tail[row, 1: len(r)] = torch.tensor(r[:-1])
        targets[row, : len(r)] = torch.tensor(r)
        tail_mask[row, : len(r)] = 1
    positions = torch.tensor([len(heads[g]) for g in prompt_of])[:, None] + torch.arange(longest)
    mask = torch.cat([head_mask.to(device)[group], tail_mask.to(device)], dim=1)
    logits = model(input_ids=tail.to(device), attention_mask=mask, position_ids=positions.to(device),
                   past_key_values=cache, use_cache=True).logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1) - lse
    logprobs = torch.where(tail_mask.to(device).bool(), picked, 0.0)
    return ResponseLogprobs(logprobs, lengths, logits, lse, [0] * len(responses))
