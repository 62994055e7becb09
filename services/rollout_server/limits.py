"""The rollout server's request limits and the checks of a generate request against the served model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proto.body_budget import BodyBudget
from proto.errors import ApiError
from proto.validation import vocab_problem
from services.common.image_refs import ImagePositions, check_image_refs, check_takes_images, expanded_lengths
from services.common.images import ImageLimits
from services.common.limits import HeaderLimits, PublishedLimits
from services.rollout_server.generator import GeneratorInfo
from services.rollout_server.waves import DEFAULT_BATCH_MEMORY_MB, MIB


@dataclass(frozen=True)
class RolloutLimits(PublishedLimits):
    max_body_bytes: int = 16 << 20
    max_weights_bytes: int = 16 << 30
    max_prompts: int = 4096
    max_n: int = 64
    max_pending_requests: int = 64
    max_request_tokens: int = 1 << 21  # prompts x n x max_tokens: what one request may ask the sampler to generate
    max_prompt_tokens: int = 1 << 20  # all prompts' tokens together
    max_prompt_chars: int = 4 << 20  # all chat messages' characters together, checked before any is tokenized
    max_batch_memory_mb: int = DEFAULT_BATCH_MEMORY_MB  # what one wave of sampled rows may hold (waves.py)
    images: ImageLimits = field(default_factory=lambda: ImageLimits(max_images=4096))  # one per prompt
    headers: HeaderLimits = field(default_factory=HeaderLimits)

    @property
    def batch_bytes(self) -> int:
        return self.max_batch_memory_mb * MIB

    def body_budget(self) -> BodyBudget:
        """The most a generate body within these limits holds: per prompt up to 16 chat messages (objects; each
        message's text is one value) and three arrays (ids, a conversation, image indices), a value per prompt token
        and image. A conversation of more messages is refused before parsing: split the request."""
        prompts = self.max_prompts
        objects = 16 * prompts + 2
        return BodyBudget(objects=objects, arrays=3 * prompts + 8,
                          values=self.max_prompt_tokens + 2 * objects + self.images.max_images + 4 * prompts + 64,
                          items=prompts, field="prompts", text=True)


def validate_prompts(prompts: list[list[int]], n: int, max_tokens: int, stop_ids: list[int], info: GeneratorInfo,
                     limits: RolloutLimits, image_indices: Sequence[Sequence[int]] | None = None,
                     n_images: int = 0) -> None:
    check_takes_images(n_images, info.image_token_id, "images")
    if len(prompts) > limits.max_prompts:
        raise ApiError(413, "batch_too_large", f"{len(prompts)} prompts; limit is {limits.max_prompts}", "prompts")
    if n > limits.max_n:
        raise ApiError(422, "invalid_field", f"n must be <= {limits.max_n}", "n")
    if (work := len(prompts) * n * max_tokens) > limits.max_request_tokens:
        raise ApiError(413, "request_too_large", f"{len(prompts)} prompts x n {n} x max_tokens {max_tokens} = {work} "
                       f"tokens to generate; one request may ask for {limits.max_request_tokens} "
                       "(the server's --max-request-tokens): split it", "max_tokens")
    if (prompt_tokens := sum(map(len, prompts))) > limits.max_prompt_tokens:
        raise ApiError(413, "request_too_large", f"the prompts hold {prompt_tokens} tokens; one request may hold "
                       f"{limits.max_prompt_tokens} (the server's --max-prompt-tokens): split it", "prompts")
    for i, p in enumerate(prompts):
        if len(p) + max_tokens > info.max_length:
            raise ApiError(422, "too_long", f"prompts[{i}] has {len(p)} tokens; with max_tokens {max_tokens} that "
                           f"exceeds the max length {info.max_length}", f"prompts[{i}]")
        check_image_refs(p, image_indices[i] if image_indices else (), n_images, info.image_token_id, f"prompts[{i}]",
                         f"image_indices[{i}]")
        if (problem := vocab_problem(p, info.vocab_size, f"prompts[{i}]")) is not None:
            raise problem
    if (problem := vocab_problem(stop_ids, info.vocab_size, "stop_token_ids")) is not None:
        raise problem


def check_expanded(prompts: list[list[int]], images: Sequence[Sequence], max_tokens: int, positions: ImagePositions,
                   info: GeneratorInfo, limits: RolloutLimits) -> list[int]:
    """The length checks again with images expanded, once the images are decoded and their sizes known; returns the
    expanded lengths."""
    lengths = expanded_lengths(list(map(len, prompts)), images, positions, info.max_length, "prompts", max_tokens)
    if (total := sum(lengths)) > limits.max_prompt_tokens:
        raise ApiError(413, "request_too_large", f"the prompts hold {total} tokens with their images expanded; one "
                       f"request may hold {limits.max_prompt_tokens} (the server's --max-prompt-tokens): split it",
                       "prompts")
    return lengths
