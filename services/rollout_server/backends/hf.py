"""transformers backend: sampling in waves of left-padded rows under a memory budget, each row from a random stream of
its own, with raw log-probs of the sampled tokens."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from modeling.multimodal import on_model, text_config
from proto.rollout import Sample
from services.common.image_refs import expanded_lengths
from services.common.models import serve_hf
from services.rollout_server.generator import GeneratorInfo, SamplingOptions, TransferUnavailable, eos_ids
from services.rollout_server.waves import RowCost, plan_waves, wave_rows


class HFGenerator:
    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "auto",
                 max_length: int | None = None) -> None:
        self.model, self.vision, base = serve_hf(model_dir, dtype, device, max_length)
        self._info = GeneratorInfo(**vars(base), eos_token_ids=eos_ids(model_dir), row_cost=row_cost(self.model))

    def info(self) -> GeneratorInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return self.vision.image_positions(size)

    def generate(self, prompts: list[list[int]], options: SamplingOptions,
                 images: list[tuple] | None = None) -> list[list[Sample]]:
        """Every sample is a row of its own, sampled in waves under `options.batch_bytes`; a row draws its tokens
        from its own stream (`_RowSampler`), so a seeded request samples the same whatever its waves."""
        lengths = list(map(len, prompts)) if images is None else \
            expanded_lengths(list(map(len, prompts)), images, self.image_positions, self._info.max_length, "prompts")
        seed = secrets.randbits(63) if options.seed is None else options.seed
        out: list[list[Sample]] = [[] for _ in prompts]
        for wave in plan_waves(lengths, options.n, options.max_tokens, self._info.row_cost, options.batch_bytes):
            rows = list(wave_rows(wave))
            for (i, _), sample in zip(rows, self._sample_rows(prompts, images, rows, options, seed), strict=True):
                out[i].append(sample)  # waves are in row order: sample j of a prompt lands at index j
        return out

    @torch.inference_mode()
    def _sample_rows(self, prompts: list[list[int]], images: list[tuple] | None, rows: list[tuple[int, int]],
                     options: SamplingOptions, seed: int) -> list[Sample]:
        from transformers import GenerationConfig, LogitsProcessorList

        batch, pixels = [prompts[i] for i, _ in rows], {}
        if images is not None:
            batch, pixels = self.vision.expand(batch, [images[i] for i, _ in rows])
        stops = set(self._info.eos_token_ids) | set(options.stop_token_ids)
        width = max(map(len, batch))
        pad = self._info.eos_token_ids[0]
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        # greedy selection over scores that our sampler (last) leaves one token: generate adds no warpers of its own,
        # and the recorder (first) sees the raw logits
        config = GenerationConfig(do_sample=False, max_new_tokens=options.max_tokens, eos_token_id=sorted(stops),
                                  pad_token_id=pad)
        recorder = _SampledLogprobs()
        device = self.model.device
        sampler = [*_warpers(options), _RowSampler(seed, rows)] if options.temperature > 0 else []
        processors = LogitsProcessorList([recorder, *self._never_image_tokens(device), *sampler])
        sequences = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                        generation_config=config, logits_processor=processors,
                                        **on_model(pixels, self.model))
        tokens = sequences[:, width:]
        logprobs = recorder.finish(tokens)
        return [_trim(t, lp, stops) for t, lp in zip(tokens.cpu().numpy(), logprobs.cpu().numpy(), strict=True)]

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


class _RowSampler:
    """The last logits processor: draws each row's token from the warped distribution by inverse CDF with a uniform
    of its own, a function of (seed, prompt, sample, step) only, and leaves greedy selection that token alone.
    generate's multinomial draws from one torch stream for the whole batch, so a row's tokens would depend on the
    rows beside it; these do not, and a request samples the same in one batch or in waves."""

    def __init__(self, seed: int, rows: list[tuple[int, int]]) -> None:
        self.seed, self.step = seed, 0
        self.prompts, self.samples = (np.array(col, dtype=np.uint64) for col in zip(*rows, strict=True))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.from_numpy(row_uniforms(self.seed, self.prompts, self.samples, self.step)).to(scores.device)
        self.step += 1
        cdf = scores.softmax(-1, dtype=torch.float64).cumsum_(-1)
        total = cdf[:, -1:]
        # below the total, so the first cdf entry above it is a token of positive probability
        x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
        picked = torch.searchsorted(cdf, x, right=True)
        return torch.full_like(scores, -torch.inf).scatter_(-1, picked, 0.0)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 whose outputs for nearby inputs look independent."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_uniforms(seed: int, prompts: np.ndarray, samples: np.ndarray, step: int) -> np.ndarray:
    """Per row, a uniform in [0, 1) for this step: a counter-based stream keyed by (seed, prompt, sample, step)."""
    h = np.full(prompts.shape, seed, dtype=np.uint64)
    for part in (prompts, samples, np.full(prompts.shape, step, dtype=np.uint64)):
        h = _mix(h + _GOLDEN + part)  # uint64 arithmetic wraps
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


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


def row_cost(model) -> RowCost:
    """An upper bound on what one row of a `generate` batch holds (measured on CPU in fp32, three model shapes and
    prompts of 8 to 1000 tokens: a row's peak was 0.5-0.86 of this). Per position: its KV cache, a quarter more
    while a step's `torch.cat` grows it, the prefill's activations (~10 hidden-size vectors at intermediate = 2 x
    hidden; bounded by 4 hidden- and 4 intermediate-size ones) and the ids and mask as they grow. Per row: a step's
    vocabulary-size tensors (logits, their fp32 copy, the recorder's log-softmax and the one before, the warpers',
    the sampler's fp64 CDF; 43 bytes a vocabulary entry measured with temperature, top-k and top-p)."""
    c = text_config(model.config)
    size = model.dtype.itemsize
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_hidden_layers * 2 * getattr(c, "num_key_value_heads", c.num_attention_heads) * head_dim * size
    activations = 4 * (c.hidden_size + c.intermediate_size) * size
    vocab = model.get_output_embeddings().weight.shape[0]
    return RowCost(per_position=kv * 5 // 4 + activations + 32, per_row=64 * vocab)
