"""The student model in the trainer: response log-probs in train precision, and right-padding of per-row arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from modeling.logprobs import ResponseLogprobs, prefill_responses
from modeling.multimodal import Vision, open_image


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
    """(B, T) log π(o_t | q, o_<t) of each response token, right-padded with 0; differentiable if grad is enabled."""
    return response_prefill(model, prompts, responses, images, vision).logprobs


def response_prefill(model, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     images: Sequence[Sequence[bytes]] | None = None,
                     vision: Vision | None = None) -> ResponseLogprobs:
    """The student's prefill of prompt + response: token log-probs, and what full distributions need.

    The same kernel as the teacher's scorer. A multimodal student gets `images` (per row, one per placeholder) and
    its `vision`: placeholders are expanded into image tokens before the forward pass, exactly as the rollout server
    and a multimodal teacher do.
    """
    pixels: dict = {}
    if vision is not None and images is not None and any(images):
        prompts, pixels = vision.expand(prompts, [[open_image(b) for b in row] for row in images])
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    return prefill_responses(model, seqs, [len(r) for r in responses], pixels)
