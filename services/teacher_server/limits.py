"""The teacher's request limits and the checks of score items against the served model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np

from proto.errors import ApiError
from proto.schemas import ScoreItem
from services.common.images import ImageLimits
from services.common.multimodal import check_image_refs
from services.teacher_server.scorer import ScorerInfo


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 << 20
    max_batch_items: int = 512
    max_request_tokens: int = 1 << 20
    max_queue_items: int = 4096
    max_batch_tokens: int = 16384
    batch_wait_ms: float = 5.0
    images: ImageLimits = field(default_factory=lambda: ImageLimits(max_images=256))  # a few groups' worth

    def as_dict(self) -> dict[str, int]:
        scalars = {f.name: int(getattr(self, f.name)) for f in fields(self) if f.name != "images"}
        return scalars | self.images.as_dict()


def validate_items(items: Sequence[ScoreItem], info: ScorerInfo, limits: Limits, n_images: int = 0) -> None:
    """Everything the scorer relies on; a request that passes can't make a backend fail on its content."""
    if len(items) > limits.max_batch_items:
        raise ApiError(413, "batch_too_large", f"{len(items)} items; limit is {limits.max_batch_items}", "items")
    total = 0
    for i, it in enumerate(items):
        n = len(it.input_ids)
        total += n
        where = f"items[{i}]"
        if n > info.max_length:
            raise ApiError(422, "too_long", f"{where}.input_ids has {n} tokens; max length is {info.max_length}",
                           f"{where}.input_ids")
        if it.response_start >= n:
            raise ApiError(422, "invalid_field", f"{where}.response_start must be < len(input_ids) = {n}",
                           f"{where}.response_start")
        if it.top_k > info.max_top_k:
            raise ApiError(422, "invalid_field", f"{where}.top_k must be <= {info.max_top_k}", f"{where}.top_k")
        check_image_refs(it.input_ids, it.response_start, it.image_indices, n_images, info.image_token_id, where,
                         f"{where}.image_indices")
        ids = np.asarray(it.input_ids, dtype=np.int64)
        bad = np.flatnonzero(ids >= info.vocab_size)
        if bad.size:
            j = int(bad[0])
            raise ApiError(422, "invalid_token", f"{where}.input_ids[{j}] = {ids[j]} is outside [0, {info.vocab_size})",
                           f"{where}.input_ids[{j}]")
    if total > limits.max_request_tokens:
        raise ApiError(413, "request_too_large", f"{total} tokens; limit is {limits.max_request_tokens}", "items")
