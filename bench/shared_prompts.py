"""Scoring a prompt's samples with one prompt pass: each backend's scorer with prompt sharing on vs off.

    python bench/shared_prompts.py [--backends hf vllm] [--models tiny wide] [--passes 4] [--repeats 3]

OPD scores n samples of every prompt, and they share the prompt token for token. Each request holds 64 sequences:
64 / n prompts x n samples (n = 1: 64 unrelated sequences), with prompt:response lengths 1:1 (64:64) or 4:1
(256:64). Reported: scored (response) tokens/s in-process, mean ± std over repeats, for the scorer that computes each
shared prompt once (`share_prompts=True`, the default; transformers: one prompt pass, vLLM: its prefix cache) and for
the same scorer scoring every sequence whole, and the ideal ratio if the prompt cost nothing after its first pass:
n(P+R) / (P+nR). Every repeat scores fresh sequences, so no pass finds the previous one's prompts in vLLM's cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from proto.schemas import ScoreItem
from services.teacher_server.backends.hf import HFScorer
from services.teacher_server.backends.vllm import VLLMScorer
from uniopd.tiny_models import build_tiny_model

MODELS = {"tiny": (128, 4), "wide": (512, 8)}  # hidden, layers


def make_requests(passes: int, samples: int, prompt: int, response: int, seed: int = 0, rows: int = 64,
                  vocab: int = 512) -> list[list[ScoreItem]]:
    """`passes` requests of `rows` random sequences, every `samples` of them sharing a prompt of `prompt` tokens."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(passes):
        heads = [rng.integers(0, vocab, prompt).tolist() for _ in range(rows // samples)]
        requests.append([ScoreItem(input_ids=h + rng.integers(0, vocab, response).tolist(), response_start=prompt)
                         for h in heads for _ in range(samples)])
    return requests


def rate(scorer: HFScorer | VLLMScorer, passes: int, samples: int, prompt: int, repeats: int, response: int = 64,
         rows: int = 64, vocab: int = 512) -> list[float]:
    """Scored tokens/s of each repeat: fresh sequences each time, after one warm-up request (the scorer returns host
    arrays, so a GPU has finished when it returns)."""
    scorer.score(make_requests(1, samples, prompt, response, 0, rows, vocab)[0])
    rates = []
    for seed in range(1, repeats + 1):
        requests = make_requests(passes, samples, prompt, response, seed, rows, vocab)
        start = time.perf_counter()
        for r in requests:
            scorer.score(r)
        rates.append(passes * rows * response / (time.perf_counter() - start))
    return rates


def fmt(rates: list[float]) -> str:
    return f"{statistics.mean(rates):,.0f} ± {statistics.stdev(rates) if len(rates) > 1 else 0:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--passes", type=int, default=4, help="requests of 64 sequences per timed pass")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompts", type=int, nargs="+", default=[64, 256], help="prompt tokens (responses are 64)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.passes} requests x 64 sequences per pass, response 64 tokens, fp32, {args.threads} threads, "
          f"repeats={args.repeats}\n")
    print("| backend | model | prompt:response | samples per prompt | shared prompt, tokens/s | "
          "whole sequences, tokens/s | ratio | ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        hidden, layers = MODELS[name]
        model = build_tiny_model(Path(tempfile.mkdtemp()) / name, "qwen3", seed=0, hidden=hidden, layers=layers)
        for backend in args.backends:
            scorer = HFScorer(model, "float32", "cpu") if backend == "hf" else VLLMScorer(model, "float32")
            for prompt in args.prompts:
                for n in args.samples:
                    scorer.share_prompts = True
                    a = rate(scorer, args.passes, n, prompt, args.repeats)
                    scorer.share_prompts = False
                    b = rate(scorer, args.passes, n, prompt, args.repeats)
                    ideal = n * (prompt + 64) / (prompt + n * 64)
                    print(f"| {backend} | {name} ({hidden}x{layers}) | {prompt}:64 | {n} | {fmt(a)} | {fmt(b)} | "
                          f"{statistics.mean(a) / statistics.mean(b):.2f} | {ideal:.2f} |", flush=True)
            del scorer

if __name__ == "__main__":
    main()
