"""The student model in the trainer: response log-probs in train precision, and its weights as safetensors bytes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from services.common.multimodal import Vision, on_model, open_image


def pad(rows: Sequence[np.ndarray | Sequence[float]], value: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Right-pad variable-length rows into a (len(rows), longest) tensor."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.tensor(np.asarray(r), dtype=dtype)
    return out


def response_logprobs(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                      images: Sequence[Sequence[bytes]] | None = None, vision: Vision | None = None) -> torch.Tensor:
    """(B, T) log π(o_t | q, o_<t) of each response token, right-padded with 0; differentiable if grad is enabled.

    A multimodal student gets `images` (per row, one per placeholder) and its `vision`: placeholders are expanded
    into image tokens before the forward pass, exactly as the rollout server and a multimodal teacher do.
    """
    pixels: dict = {}
    if vision is not None and images is not None and any(images):
        prompts, pixels = vision.expand(prompts, [[open_image(b) for b in row] for row in images])
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(len(s) for s in seqs)
    device = next(model.parameters()).device
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
    first = min(len(p) for p in prompts) - 1
    keep = torch.arange(first, width - 1, device=device)
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=keep,
                   **on_model(pixels, model)).logits.float()
    token_lp = logits.log_softmax(-1).gather(-1, ids[:, first + 1:].to(device).unsqueeze(-1)).squeeze(-1)
    longest = max(len(r) for r in responses)
    out = torch.zeros((len(seqs), longest), dtype=token_lp.dtype, device=device)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        start = len(p) - 1 - first
        out[i, : len(r)] = token_lp[i, start : start + len(r)]
    return out
