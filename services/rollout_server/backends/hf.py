"""transformers backend: batched sampling (left-padded prompts) with raw log-probs of the sampled tokens."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from modeling.multimodal import on_model
from proto.rollout import Sample
from services.common.models import serve_hf
from services.rollout_server.generator import GeneratorInfo, SamplingOptions, TransferUnavailable, eos_ids


class HFGenerator:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "auto",
                 max_length: int | None = None) -> None:
        self.model, self.vision, base = serve_hf(model_dir, dtype, device, max_length)
        self._info = GeneratorInfo(**vars(base), eos_token_ids=eos_ids(model_dir))

    def info(self) -> GeneratorInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return self.vision.image_positions(size)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], options: SamplingOptions,
                 images: list[tuple] | None = None) -> list[list[Sample]]:
        from transformers import GenerationConfig, LogitsProcessorList

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
        # the warpers are ours, after the recorder, so it sees the raw logits; generate adds none of its own
        config = GenerationConfig(
            do_sample=sampled, temperature=1.0, top_p=1.0, top_k=0 if sampled else None, num_return_sequences=n,
            max_new_tokens=options.max_tokens, eos_token_id=sorted(stops), pad_token_id=pad,
            return_dict_in_generate=True)
        recorder = _SampledLogprobs()
        device = self.model.device
        processors = LogitsProcessorList([recorder, *self._never_image_tokens(device),
                                          *(_warpers(options) if sampled else ())])
        if options.seed is not None:
            torch.manual_seed(options.seed)
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                  logits_processor=processors, **on_model(pixels, self.model))
        tokens = out.sequences[:, width:]
        logprobs = recorder.finish(tokens)
        flat = [_trim(t, lp, stops) for t, lp in zip(tokens.cpu().numpy(), logprobs.cpu().numpy(), strict=True)]
        return [flat[i:i + options.n] for i in range(0, len(flat), options.n)]

    def _never_image_tokens(self, device) -> list:
        """An image placeholder is never generated (after the recorder: the log-probs stay those of the raw logits)."""
        from transformers.generation.logits_process import SuppressTokensLogitsProcessor

        return [SuppressTokensLogitsProcessor(sorted(self.vision.image_token_ids), device)] if self.vision else []

    def load_weights(self, tensors: dict) -> None:
        params = self.model.state_dict()
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)

    def weight_transfer(self) -> NoReturn:
        raise TransferUnavailable("the hf backend has no weight-transfer engine (the engines are vLLM's): push "
                                  "weights over POST /v1/weights, or serve with --backend vllm --weight-transfer")


class _SampledLogprobs:
    """A logits processor that keeps, per row, the log-prob of each sampled token under the raw logits, one step late
    (step t's token is known at step t + 1): one [rows, vocab] tensor alive, where generate's `output_logits` kept
    all of them (rows x new tokens x vocab floats: tens of GB with a real vocabulary)."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.picked.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = scores.float().log_softmax(-1)
        return scores

    def finish(self, tokens: torch.Tensor) -> torch.Tensor:
        """[rows, new tokens] log-probs; `tokens` are the generated ones (their last column is not seen above)."""
        self.picked.append(self.last.gather(-1, tokens[:, -1:]).squeeze(-1))
        return torch.stack(self.picked, 1)


def _warpers(options: SamplingOptions) -> list:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = [TemperatureLogitsWarper(options.temperature)] if options.temperature != 1.0 else []
    if options.top_k:
        warpers.append(TopKLogitsWarper(options.top_k))
    if options.top_p < 1.0:
        warpers.append(TopPLogitsWarper(options.top_p))
    return warpers


def _trim(tokens: np.ndarray, logprobs: np.ndarray, stops: set[int]) -> Sample:
    """Cut after the first stop token (generate pads finished rows); no stop token means the length limit hit."""
    hits = np.flatnonzero(np.isin(tokens, list(stops)))
    if hits.size:
        end = int(hits[0]) + 1
        return Sample(tokens[:end].astype(np.int32), logprobs[:end].astype(np.float32), "stop")
    return Sample(tokens.astype(np.int32), logprobs.astype(np.float32), "length")
