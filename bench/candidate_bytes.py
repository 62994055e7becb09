"""Bytes on the wire per scored position for candidate scoring (per-position candidates, k = 1, 8, 32, 128), in
both encodings and msgpack with float16 responses (`float_dtype`), request and response, as the real codec encodes
them.

    python bench/candidate_bytes.py

Workload: 64 items of 256 tokens, the last 128 the response (so 8192 scored positions), token ids and log-probs
drawn at random from a 151,936-token vocabulary (Qwen3's), so JSON numbers have realistic lengths. The rows "no
candidates" are the plain sampled-token scoring for comparison. Sizes are deterministic (seeded).
"""

from __future__ import annotations

import numpy as np

from proto.codec import ScoredSpan, encode_score_request, encode_score_response
from proto.fingerprint import make_fingerprint
from proto.schemas import ScoreItem

ITEMS, LENGTH, RESPONSE, VOCAB = 64, 256, 128, 151_936
FINGERPRINT = make_fingerprint("tiny", "r" * 64, "t" * 64, "float32", "hf")


def workload(k: int, rng: np.random.Generator) -> tuple[list[ScoreItem], list[ScoredSpan]]:
    items, spans = [], []
    for _ in range(ITEMS):
        ids = rng.integers(0, VOCAB, LENGTH).tolist()
        candidates = [rng.choice(VOCAB, k, replace=False).tolist() for _ in range(RESPONSE)] if k else None
        items.append(ScoreItem(input_ids=ids, response_start=LENGTH - RESPONSE, candidates=candidates))
        span = ScoredSpan(-rng.exponential(2, RESPONSE).astype(np.float32))
        if k:
            span.candidate_logprobs = -rng.exponential(4, (RESPONSE, k)).astype(np.float32)
            span.tail_logprobs = -rng.exponential(0.5, RESPONSE).astype(np.float32)
        spans.append(span)
    return items, spans


def main() -> None:
    positions = ITEMS * RESPONSE
    print("| candidates k | encoding | request bytes / position | response bytes / position |")
    print("|---|---|---|---|")
    for k in (0, 1, 8, 32, 128):
        items, spans = workload(k, np.random.default_rng(k))
        for binary, floats, name in ((True, "float32", "msgpack"), (True, "float16", "msgpack, float16"),
                                     (False, "float32", "JSON")):
            request = len(encode_score_request(items, binary, float_dtype=floats))
            response = len(encode_score_response(FINGERPRINT, spans, binary, floats))
            print(f"| {k or 'none (sampled token only)'} | {name} | {request / positions:,.1f} | "
                  f"{response / positions:,.1f} |")


if __name__ == "__main__":
    main()
