"""uniopd teachers against stock `vllm serve` scoring the same sequences, in one run.

    python bench/peer_scoring.py [--models tiny wide] [--requests 64] [--concurrency 1 8 32] [--repeats 3]
                                 [--samples 1] [--shape 128:128] [--servers peer vllm vllm-fp16 hf]

Workload: `--requests` requests of 8 sequences (or `--samples`, if more) of P prompt + R response tokens
(`--shape P:R`, default 128:128), the response scored (a trainer scoring a group of rollouts). With `--samples n`
every n sequences share their prompt token for token, as a prompt's OPD samples do (n = 1: unrelated sequences).
uniopd: `POST /v1/score`, msgpack (float32 and float16 responses), on its vLLM and transformers backends. The peer:
stock `vllm serve` on the same model with the same engine settings (dtype, max model length, eager mode, batch
budget; prefix caching at vLLM's default), `POST /v1/completions` with the sequences as token-id prompts,
`max_tokens: 1` and `prompt_logprobs: 0` (vLLM's way to get each prompt token's log-prob). The two are checked to
return the same log-probs before anything is timed. Reported per configuration: scored tokens/s (mean ± std over
repeats), scored tokens per server CPU-second (the server's process tree), p50/p99 request latency, response bytes
per scored token, and the ratio of tokens/s to the peer at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from proto.client import TeacherClient
from proto.schemas import ScoreItem
from services.common.models import CPU_TOKEN_BUDGET
from uniopd.launch import ServerProcess, free_port, spawn_server, start_teacher
from uniopd.tiny_models import build_tiny_model

MODELS = {"tiny": (128, 4), "wide": (512, 8)}  # hidden, layers
ITEMS, MAX_LENGTH = 8, 512
SERVERS = {"peer": ("vllm serve (peer)", None, None), "vllm": ("uniopd vllm", "vllm", "float32"),
           "vllm-fp16": ("uniopd vllm, float16", "vllm", "float16"), "hf": ("uniopd hf", "hf", "float32")}


def start_peer(model: Path, log_dir: Path, timeout: float = 300.0) -> ServerProcess:
    """Stock `vllm serve`, sized as uniopd's vLLM backend sizes its engine on CPU (services.common.models)."""
    port = free_port()
    seqs = max(1, CPU_TOKEN_BUDGET // (MAX_LENGTH + 1))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(MAX_LENGTH + 1), "--enforce-eager",
           "--max-logprobs", "-1", "--max-num-seqs", str(seqs), "--max-num-batched-tokens",
           str(seqs * (MAX_LENGTH + 1)), "--seed", "0"]
    return spawn_server(cmd, port, log_dir / f"vllm-serve-{port}.log", "vllm serve", ready_path="/health",
                        timeout=timeout, env={"VLLM_CPU_KVCACHE_SPACE": "1"})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its descendants so far."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Uniopd:
    def __init__(self, url: str, float_dtype: str) -> None:
        self.client = TeacherClient(url, binary=True, float_dtype=float_dtype)

    @property
    def received(self) -> int:
        return self.client.bytes_received

    async def score(self, batch: list[ScoreItem]) -> list[np.ndarray]:
        _, spans = await self.client.score(batch)
        return [s.logprobs for s in spans]

    async def aclose(self) -> None:
        await self.client.aclose()


class Peer:
    def __init__(self, url: str, model: Path) -> None:
        self.http = httpx.AsyncClient(base_url=url, timeout=600)
        self.model = str(model)
        self.received = 0

    async def score(self, batch: list[ScoreItem]) -> list[np.ndarray]:
        resp = await self.http.post("/v1/completions", json={
            "model": self.model, "prompt": [it.input_ids for it in batch], "max_tokens": 1, "prompt_logprobs": 0})
        resp.raise_for_status()
        choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
        spans = []
        for it, choice in zip(batch, choices, strict=True):
            rows = choice["prompt_logprobs"][it.response_start:]
            spans.append(np.array([row[str(t)]["logprob"] for row, t in
                                   zip(rows, it.input_ids[it.response_start:], strict=True)], dtype=np.float32))
        self.received += len(resp.content)
        return spans

    async def aclose(self) -> None:
        await self.http.aclose()


async def measure(scorer, batches: list[list[ScoreItem]], concurrency: int, pid: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(batch):
        async with sem:
            start = time.perf_counter()
            await scorer.score(batch)
            latencies.append(time.perf_counter() - start)

    received = scorer.received  # over the whole run: with requests in flight together, per-call deltas overlap
    cpu, start = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(one(b) for b in batches))
    wall, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    received = scorer.received - received
    tokens = sum(len(it.input_ids) - it.response_start for b in batches for it in b)
    return {"rate": tokens / wall, "per_cpu_s": tokens / cpu, "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)), "bytes": received / tokens}


async def reference(peer: Peer, batch: list[ScoreItem]) -> list[np.ndarray]:
    """The peer's scores of one batch, which every uniopd server must reproduce before it is timed."""
    spans = await peer.score(batch)
    await peer.aclose()
    return spans


async def agree(scorer: Uniopd, batch: list[ScoreItem], want: list[np.ndarray], atol: float) -> None:
    got = await scorer.score(batch)
    await scorer.aclose()
    worst = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
    if worst > atol:
        raise AssertionError(f"scores differ from the peer's by {worst:.2e} (> {atol}): not the same computation")


async def bench_server(scorer, batches, concurrencies: list[int], repeats: int, pid: int) -> dict[int, dict]:
    """Per concurrency: the means over repeats, and the spread of tokens/s; one event loop for the client."""
    await measure(scorer, batches[:4], 1, pid)  # warm-up
    out = {}
    for conc in concurrencies:
        runs = [await measure(scorer, batches, conc, pid) for _ in range(repeats)]
        out[conc] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        out[conc]["rate_sd"] = statistics.stdev(r["rate"] for r in runs) if repeats > 1 else 0.0
    await scorer.aclose()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1, help="sequences sharing each prompt (1: unrelated)")
    ap.add_argument("--shape", default="128:128", help="prompt:response tokens of every sequence")
    ap.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS),
                    help="the peer first: the ratios need it")
    ap.add_argument("--max-batch-tokens", type=int, help="uniopd teachers' micro-batch budget (default: theirs)")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args()
    budget = ["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else []
    prompt, response = (int(x) for x in args.shape.split(":"))
    per_request = max(ITEMS, args.samples)
    if per_request % args.samples or prompt + response > MAX_LENGTH or args.servers[0] != "peer":
        ap.error(f"--samples must divide {per_request}, --shape fit in {MAX_LENGTH} tokens, --servers start with peer")
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(args.requests):
        heads = [rng.integers(0, 512, prompt).tolist() for _ in range(per_request // args.samples)]
        batches.append([ScoreItem(input_ids=h + rng.integers(0, 512, response).tolist(), response_start=prompt)
                        for h in heads for _ in range(args.samples)])
    logs = Path(tempfile.mkdtemp())
    print(f"{args.requests} requests x {per_request} sequences of {prompt}:{response} prompt:response tokens "
          f"(the response scored; {args.samples} samples a prompt), fp32, repeats={args.repeats}\n")
    print("| model | server | concurrency | scored tokens/s | vs peer | tokens per server CPU-s | p50 / p99 ms | "
          "response bytes/token |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name in args.models:
        hidden, layers = MODELS[name]
        model = build_tiny_model(logs / name, "qwen3", seed=0, hidden=hidden, layers=layers)
        peer_rates: dict[int, float] = {}
        for label, backend, floats in (SERVERS[s] for s in args.servers):
            server = (start_peer(model, logs) if backend is None else
                      start_teacher(model, backend, ["--max-length", str(MAX_LENGTH), "--batch-wait-ms", "2", *budget],
                                    log_dir=logs))
            with server:
                if backend is None:
                    want = asyncio.run(reference(Peer(server.url, model), batches[0]))
                else:
                    asyncio.run(agree(Uniopd(server.url, floats), batches[0], want,
                                      2e-2 if floats == "float16" else 2e-3))
                scorer = Peer(server.url, model) if backend is None else Uniopd(server.url, floats)
                measured = asyncio.run(bench_server(scorer, batches, args.concurrency, args.repeats, server.proc.pid))
            for conc, r in measured.items():
                if backend is None:
                    peer_rates[conc] = r["rate"]
                r.update(model=name, server=label, concurrency=conc, vs_peer=r["rate"] / peer_rates[conc])
                results.append(r)
                print(f"| {name} ({hidden}x{layers}) | {label} | {conc} | {r['rate']:,.0f} ± {r['rate_sd']:,.0f} "
                      f"| {r['vs_peer']:.2f} | {r['per_cpu_s']:,.0f} | {1e3 * r['p50']:,.0f} / "
                      f"{1e3 * r['p99']:,.0f} | {r['bytes']:.1f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
