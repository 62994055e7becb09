"""What the vLLM teacher's per-position Python costs, by the kind of item scored.

    python bench/vllm_item_kinds.py [--repeats 6] [--items 64] [--prompt 64] [--response 64]

vLLM returns prompt log-probs per position; what the scorer asks for decides how many entries each position holds:
the scored token (sampled-token items), the token and its top-k with ranks, or the token and the whole vocabulary
(items with candidates or a distribution). Reported: ms per `VLLMScorer.score` call of `--items` unrelated
sequences on the tiny model (vocabulary 512), fp32, median and min over the repeats after the first (warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from proto.schemas import ScoreItem
from services.teacher_server.backends.vllm import VLLMScorer
from uniopd.tiny_models import build_tiny_model

KINDS = {"sampled token": {}, "top-8 and ranks": {"top_k": 8, "ranks": True},
         "8 candidates (whole distribution)": {"candidates": [list(range(8))]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scorer = VLLMScorer(build_tiny_model(Path(tmp) / "tiny", "qwen3", seed=0), "float32", share_prompts=False)
        rng = np.random.default_rng(0)
        print(f"{args.items} sequences of {args.prompt}:{args.response} tokens a call, ms per call, median / min over "
              f"{args.repeats - 1} repeats")
        print("| item | ms per call |\n|---|---|")
        for kind, options in KINDS.items():
            times = []
            for _ in range(args.repeats):
                items = [ScoreItem(input_ids=rng.integers(0, 512, args.prompt + args.response).tolist(),
                                   response_start=args.prompt, **options) for _ in range(args.items)]
                start = time.perf_counter()
                scorer.score(items)
                times.append((time.perf_counter() - start) * 1e3)
            print(f"| {kind} | {statistics.median(times[1:]):.0f} / {min(times[1:]):.0f} |")


if __name__ == "__main__":
    main()
