"""The trainer's cost of a step whose teacher scores are all in the score cache.

    python bench/cache_hits.py [--items 1024] [--samples 16] [--prompt 128] [--response 128] [--topk 0] [--repeats 20]

Builds `--items` rollouts (`--samples` per prompt), stores their scores once, then times the all-hit path the trainer
runs every step: the cache keys, the MGET and the decode, alone and through `TeacherRouter.score_spans` (keys, MGET,
decode, per-domain counts), against the in-process store (`memory://`: the trainer's CPU cost alone) and a real
redis-server on loopback (adds the round trip and Redis' own work). Reported: milliseconds per call for all the items,
median and p90 over repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from types import SimpleNamespace

import numpy as np

from proto.schemas import ScoreItem
from proto.validation import score_item_problem
from trainer.score_cache import MEMORY_URL, ScoreCache
from trainer.teacher_router import Endpoint, TeacherRouter
from uniopd.launch import RedisServer

DIGEST = "0" * 64


def make_arrays(items: int, samples: int, prompt: int, response: int,
                topk: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Rollouts as the trainer holds them: one int32 prompt array shared by its samples, each sample's int32
    response, and its top-k candidates under the topk signal."""
    rng = np.random.default_rng(0)
    heads = [rng.integers(0, 512, prompt, dtype=np.int32) for _ in range(items // samples)]
    for head in heads:
        head.flags.writeable = False  # as trainer/data.py's Example.prompt_array
    return [(h, rng.integers(0, 512, response, dtype=np.int32),
             rng.integers(0, 512, (response, topk), dtype=np.int32) if topk else None)
            for h in heads for _ in range(samples)]


def make_items(arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> list[ScoreItem]:
    """As the trainer builds them (trainer/loop.py score)."""
    return [ScoreItem.of_arrays(head, response, candidates=candidates) for head, response, candidates in arrays]


def timed_ms(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))]


def router_for(cache: ScoreCache) -> TeacherRouter:
    """A router whose pool already agreed on a fingerprint: the all-hit path never reaches the (absent) teacher."""
    router = TeacherRouter({"math": [Endpoint("http://127.0.0.1:9")]}, cache)
    router._pools["math"].digest = DIGEST
    return router


def bench(url: str, items: list[ScoreItem], repeats: int, build) -> dict[str, tuple[float, float]]:
    loop = asyncio.new_event_loop()
    cache = ScoreCache(url)
    router = router_for(cache)
    requests = [("math", item) for item in items]
    digests = [DIGEST] * len(items)
    keys = ScoreCache.keys(digests, items)
    _, lengths = router._checked(requests)  # float32 values per entry: the span, then any candidates and tail
    rng = np.random.default_rng(1)
    loop.run_until_complete(cache.set_many({k: rng.standard_normal(n).astype(np.float32)
                                            for k, n in zip(keys, lengths, strict=True)}))
    bounds = SimpleNamespace(max_length=4096, vocab_size=512, max_top_k=20, image_token_id=None)
    out = {
        "items": timed_ms(lambda: [score_item_problem(item, bounds) for item in build()], repeats),
        "keys": timed_ms(lambda: ScoreCache.keys(digests, items), repeats),
        "get_many": timed_ms(lambda: loop.run_until_complete(cache.get_many(keys, lengths)), repeats),
        "score_spans": timed_ms(lambda: loop.run_until_complete(router.score_spans(requests)), repeats),
    }
    assert all(s is not None for s in loop.run_until_complete(router.score_spans(requests)))
    loop.run_until_complete(router.aclose())
    loop.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, default=128)
    ap.add_argument("--topk", type=int, default=0, help="candidates per position (the topk signal); 0: none")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    arrays = make_arrays(args.items, args.samples, args.prompt, args.response, args.topk)

    def build() -> list[ScoreItem]:
        return make_items(arrays)

    items = build()
    redis = RedisServer().start()
    try:
        results = {"memory": bench(MEMORY_URL, items, args.repeats, build),
                   "redis": bench(redis.url, items, args.repeats, build)}
    finally:
        redis.stop()
    print(f"{len(items)} cached items, {args.samples} per prompt, {args.prompt}:{args.response} tokens, "
          f"top-{args.topk} candidates; "
          f"ms per call, median / p90 over {args.repeats} repeats")
    print("| store | items | keys | get_many | score_spans |")
    print("|---|---|---|---|---|")
    for store, row in results.items():
        print(f"| {store} | " + " | ".join(f"{m:.2f} / {p:.2f}" for m, p in row.values()) + " |")


if __name__ == "__main__":
    main()
