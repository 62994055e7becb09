"""The teacher's request limits and the checks of score items against the served model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from proto.body_budget import BodyBudget
from proto.errors import ApiError
from proto.schemas import ScoreItem
from proto.validation import distribution_values, score_item_problem
from services.common.image_refs import ImagePositions, check_image_refs, check_takes_images, expanded_lengths
from services.common.images import ImageLimits
from services.common.limits import HeaderLimits, PublishedLimits
from services.teacher_server.scorer import ScorerInfo


@dataclass(frozen=True)
class Limits(PublishedLimits):
    max_body_bytes: int = 64 << 20
    max_batch_items: int = 512
    max_request_tokens: int = 1 << 20
    max_queue_items: int = 4096
    max_batch_tokens: int = 16384
    # values beyond one per position, summed over a request: R x vocab per distribution item, R x k per candidate
    # item (R x vocab where the backend picks candidates from a full distribution); 16 MiB of float32
    max_distribution_values: int = 1 << 22
    batch_wait_ms: float = 5.0
    refusal_delay_s: float = 1.0  # a request a team's quotas refuse unread is answered after this (or its Retry-After)
    images: ImageLimits = field(default_factory=lambda: ImageLimits(max_images=256))  # a few groups' worth
    headers: HeaderLimits = field(default_factory=HeaderLimits)

    def body_budget(self, field: str = "items", rows_per_position: bool = True) -> BodyBudget:
        """The most a body within these limits holds, whatever the route: the request's object and one per item (an
        item, or its options), three arrays per item (ids, candidates, images; and one per response position where
        candidates come as rows), a value per token id, candidate id, image and option. The item limit is what keeps
        objects, the costly part of a parse, few (bench/body_parse.py)."""
        items = self.max_batch_items
        return BodyBudget(objects=items + 2,
                          arrays=3 * items + 4 + (self.max_request_tokens if rows_per_position else 0),
                          values=self.max_request_tokens + self.max_distribution_values + 32 * items
                          + self.images.max_images + 64, items=items, field=field)


# --max-batch-tokens on CPU: bench/peer_scoring.py (wide model, concurrency 8, 2 cores) measured the same tokens/s
# at 2048 as at 16384 and a median latency 40% lower; GPUs keep Limits' default
CPU_BATCH_TOKENS = 2048


def batch_tokens_for(device: str) -> int:
    """The coalesced-call token budget when --max-batch-tokens is not given, for the device the model runs on."""
    from services.common.models import resolve_device

    return Limits.max_batch_tokens if resolve_device(device).type == "cuda" else CPU_BATCH_TOKENS


def validate_items(items: Sequence[ScoreItem], info: ScorerInfo, limits: Limits, n_images: int = 0) -> None:
    """Everything the scorer relies on; a request that passes can't make a backend fail on its content."""
    check_takes_images(n_images, info.image_token_id, "images")
    if len(items) > limits.max_batch_items:
        raise ApiError(413, "batch_too_large", f"{len(items)} items; limit is {limits.max_batch_items}", "items")
    total = values = 0
    for i, it in enumerate(items):
        total += len(it.input_ids)
        values += distribution_values(it, info.vocab_size, info.candidate_scoring)
        where = f"items[{i}]"
        if (problem := score_item_problem(it, info, where)) is not None:
            raise problem
        check_image_refs(it.input_ids[: it.response_start], it.image_indices, n_images, info.image_token_id, where,
                         f"{where}.image_indices")
    if total > limits.max_request_tokens:
        raise ApiError(413, "request_too_large", f"{total} tokens; limit is {limits.max_request_tokens}", "items")
    if values > limits.max_distribution_values:
        raise ApiError(413, "distribution_too_large", f"the items asking for a distribution or candidates need "
                       f"{values} values (response positions x vocab {info.vocab_size} or x candidates, "
                       f"candidate scoring {info.candidate_scoring!r}); limit is {limits.max_distribution_values}",
                       "items")


def check_expanded(items: Sequence[ScoreItem], images: Sequence[Sequence], positions: ImagePositions,
                   info: ScorerInfo, limits: Limits) -> None:
    """The length checks again with images expanded, once the images are decoded and their sizes known."""
    lengths = expanded_lengths([len(it.input_ids) for it in items], images, positions, info.max_length, "items")
    if (total := sum(lengths)) > limits.max_request_tokens:
        raise ApiError(413, "request_too_large", f"{total} tokens with the images expanded; limit is "
                       f"{limits.max_request_tokens}", "items")
