"""The generator protocol every rollout backend implements; routes only ever see this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proto.rollout import Sample
from services.common.models import ModelInfo
from services.rollout_server.waves import DEFAULT_BATCH_MEMORY_MB, MIB, RowCost


@dataclass(frozen=True)
class SamplingOptions:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    batch_bytes: int = DEFAULT_BATCH_MEMORY_MB * MIB  # what one wave of rows may hold (--max-batch-memory-mb)


@dataclass(frozen=True)
class GeneratorInfo(ModelInfo):
    eos_token_ids: tuple[int, ...] = ()
    row_cost: RowCost | None = None  # what one sampled row holds; None: the generator samples a request in one batch


class TransferUnavailable(Exception):
    """This generator takes no weights through a weight-transfer engine; the message says why and what to use."""


class WeightTransfer(Protocol):
    """vLLM's weight-update calls on the served engine: a trainer-side transfer engine drives them through the
    server's /v1/weights/transfer routes and sends the tensors over its own data plane (gloo, NCCL)."""

    backend: str
    workers: int  # the group's receiving ranks
    joined: bool  # a trainer's group is formed (init succeeded)

    def init(self, init_info: dict) -> None:
        """Join the trainer's group; blocks until it forms. A second init replaces the first group."""
        ...

    def start(self) -> None: ...

    def receive(self, update_info: dict) -> None:
        """Receive the declared tensors (names and shapes are already validated) into the model."""
        ...

    def finish(self) -> None:
        """Make the received weights the ones that sample."""
        ...

    def abort(self) -> None:
        """End a round that will not finish, leaving a model that can sample."""
        ...


class Generator(Protocol):
    def info(self) -> GeneratorInfo: ...

    def image_positions(self, size: tuple[int, int]) -> int:
        """Positions an image of this (width, height) takes once expanded (asked of a multimodal generator only)."""
        ...

    def generate(self, prompts: list[list[int]], options: SamplingOptions,
                 images: list[tuple] | None = None) -> list[list[Sample]]:
        """`options.n` samples per prompt, each with the sampler's raw log-prob of every generated token; a generator
        whose info gives a `row_cost` samples them in waves (waves.py) under `options.batch_bytes`.

        `images[i]`: prompt i's decoded images, one per placeholder, in order (a multimodal generator only).
        """
        ...

    def load_weights(self, tensors: dict) -> None:
        """Replace (some of) the weights in place; names and shapes are already validated."""
        ...

    def weight_transfer(self) -> WeightTransfer:
        """The engine that takes weights from a trainer's transfer engine; raises TransferUnavailable without one."""
        ...


def eos_ids(model_dir) -> tuple[int, ...]:
    """EOS ids from generation_config and the tokenizer, which disagree for some chat models."""
    from transformers import GenerationConfig

    from services.common.models import load_tokenizer

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    except OSError:
        pass
    tok = load_tokenizer(model_dir)
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    return tuple(sorted(ids))
