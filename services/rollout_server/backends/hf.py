"""transformers backend: batched sampling (left-padded prompts) with raw log-probs of the sampled tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from modeling.multimodal import on_model
from proto.rollout import Sample
from services.common.models import serve_hf
from services.rollout_server.generator import GeneratorInfo, SamplingOptions, eos_ids


class HFGenerator:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "auto",
                 max_length: int | None = None) -> None:
        self.model, self.vision, base = serve_hf(model_dir, dtype, device, max_length)
        self._info = GeneratorInfo(**vars(base), eos_token_ids=eos_ids(model_dir))

    def info(self) -> GeneratorInfo:
        return self._info

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], options: SamplingOptions,
                 images: list[tuple] | None = None) -> list[list[Sample]]:
        from transformers import GenerationConfig

        n, pixels = options.n, {}
        if images is not None:
            # each sample is its own row: generate's num_return_sequences would repeat image tensors per prompt,
            # not per image
            prompts, pixels = self.vision.expand([p for p in prompts for _ in range(n)],
                                                 [im for im in images for _ in range(n)])
            n = 1
        stops = set(self._info.eos_token_ids) | set(options.stop_token_ids)
        width = max(len(p) for p in prompts)
        pad = self._info.eos_token_ids[0]
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        sampled = options.temperature > 0
        config = GenerationConfig(
            do_sample=sampled, temperature=options.temperature if sampled else None,
            top_p=options.top_p if sampled else None, top_k=options.top_k if sampled else None,
            num_return_sequences=n, max_new_tokens=options.max_tokens, eos_token_id=sorted(stops),
            pad_token_id=pad, output_logits=True, return_dict_in_generate=True,
            suppress_tokens=sorted(self.vision.image_token_ids) if self.vision else None)
        if options.seed is not None:
            torch.manual_seed(options.seed)
        device = self.model.device
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                  **on_model(pixels, self.model))
        tokens = out.sequences[:, width:]
        logprobs = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        flat = [_trim(t, lp, stops) for t, lp in zip(tokens.cpu().numpy(), logprobs.cpu().numpy(), strict=True)]
        return [flat[i:i + options.n] for i in range(0, len(flat), options.n)]

    def load_weights(self, tensors: dict) -> None:
        params = self.model.state_dict()
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)


def _trim(tokens: np.ndarray, logprobs: np.ndarray, stops: set[int]) -> Sample:
    """Cut after the first stop token (generate pads finished rows); no stop token means the length limit hit."""
    hits = np.flatnonzero(np.isin(tokens, list(stops)))
    if hits.size:
        end = int(hits[0]) + 1
        return Sample(tokens[:end].astype(np.int32), logprobs[:end].astype(np.float32), "stop")
    return Sample(tokens.astype(np.int32), logprobs.astype(np.float32), "length")
