"""Request limits: body size (enforced while the body streams in) and the checks of items against the model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from proto.errors import ApiError
from proto.schemas import ScoreItem
from services.teacher_server.scorer import ScorerInfo


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 << 20
    max_batch_items: int = 512
    max_request_tokens: int = 1 << 20
    max_queue_items: int = 4096
    max_batch_tokens: int = 16384
    batch_wait_ms: float = 5.0

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in asdict(self).items()}


def validate_items(items: Sequence[ScoreItem], info: ScorerInfo, limits: Limits) -> None:
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
        ids = np.asarray(it.input_ids, dtype=np.int64)
        bad = np.flatnonzero(ids >= info.vocab_size)
        if bad.size:
            j = int(bad[0])
            raise ApiError(422, "invalid_token", f"{where}.input_ids[{j}] = {ids[j]} is outside [0, {info.vocab_size})",
                           f"{where}.input_ids[{j}]")
    if total > limits.max_request_tokens:
        raise ApiError(413, "request_too_large", f"{total} tokens; limit is {limits.max_request_tokens}", "items")


class BodyLimitMiddleware:
    """413 before reading a declared-too-large body, and as soon as a chunked body crosses the limit."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _send_error(send, ApiError(413, "body_too_large", f"body exceeds {self.max_bytes} bytes"))
            return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, "body_too_large", f"body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
