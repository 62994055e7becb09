"""Teacher scoring throughput: HTTP (per backend, encoding, concurrency) vs the same backend called in-process.

    python bench/score_throughput.py [--backends hf vllm] [--requests 64] [--repeats 3] [--out bench/results.md]

Every request carries `--items` sequences of `--length` tokens whose second half is the scored response, like a
trainer scoring a group of rollouts. The in-process baseline calls `scorer.score` on exactly the same batches, one
request's items per call. Reported: scored (response) tokens per second, mean ± std over repeats, and bytes on the
wire per scored token (request and response bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from proto.client import TeacherClient
from proto.schemas import ScoreItem
from uniopd.launch import start_teacher
from uniopd.tiny_models import build_tiny_model


def make_batches(n_requests: int, items: int, length: int, seed: int = 0) -> list[list[ScoreItem]]:
    rng = np.random.default_rng(seed)
    return [[ScoreItem(input_ids=rng.integers(0, 512, length).tolist(), response_start=length // 2)
             for _ in range(items)] for _ in range(n_requests)]


def scored_tokens(batches: list[list[ScoreItem]]) -> int:
    return sum(len(it.input_ids) - it.response_start for b in batches for it in b)


async def http_run(url: str, batches, binary: bool, concurrency: int) -> tuple[float, int, int]:
    """Seconds for all batches, plus request and response bytes summed."""
    sem = asyncio.Semaphore(concurrency)
    async with TeacherClient(url, binary=binary) as client:
        async def one(batch):
            async with sem:
                await client.score(batch)

        await one(batches[0])  # warm-up
        client.bytes_sent = client.bytes_received = 0
        start = time.perf_counter()
        await asyncio.gather(*(one(b) for b in batches))
        return time.perf_counter() - start, client.bytes_sent, client.bytes_received


def in_process(backend: str, model: Path, batches, repeats: int) -> list[float]:
    from services.teacher_server.backends import load_scorer

    scorer = load_scorer(backend, model, "float32", None, 20)
    scorer.score(batches[0])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            scorer.score(b)
        rates.append(scored_tokens(batches) / (time.perf_counter() - start))
    return rates


def fmt(rates: list[float]) -> str:
    sd = statistics.stdev(rates) if len(rates) > 1 else 0.0
    return f"{statistics.mean(rates):,.0f} ± {sd:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    model = build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", "qwen3", seed=0)
    batches = make_batches(args.requests, args.items, args.length)
    tokens = scored_tokens(batches)
    rows = [f"workload: {args.requests} requests x {args.items} items x {args.length} tokens "
            f"({tokens} scored tokens per pass), fp32, repeats={args.repeats}", "",
            "| backend | path | encoding | concurrency | scored tokens/s | req bytes/token | resp bytes/token |",
            "|---|---|---|---|---|---|---|"]
    for backend in args.backends:
        with start_teacher(model, backend, ["--batch-wait-ms", "2"]) as server:
            for binary in (False, True):
                for conc in args.concurrency:
                    runs = [asyncio.run(http_run(server.url, batches, binary, conc)) for _ in range(args.repeats)]
                    rates = [tokens / secs for secs, _, _ in runs]
                    _, sent, received = runs[-1]
                    rows.append(f"| {backend} | HTTP | {'msgpack' if binary else 'JSON'} | {conc} | {fmt(rates)} | "
                                f"{sent / tokens:.1f} | {received / tokens:.1f} |")
                    print(rows[-1], flush=True)
        rows.append(f"| {backend} | in-process | - | 1 | {fmt(in_process(backend, model, batches, args.repeats))} "
                    "| - | - |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
