"""Whether a team over its quota slows another team down: team beta's latency alone, then while team alpha floods.

    python bench/quota_flood.py [--seconds 20] [--flooders 4] [--items 512] [--server-repo PATH]

A real teacher process (hf backend, tiny model, one thread) with a team file: alpha has 1,000 tokens a minute, beta
no limits. beta sends small scoring requests (8 items x 64 tokens) one after another; then `--flooders` clients of
alpha send bodies of `--items` items of 500 tokens (512: 2.5 MB; each asks for more than alpha's quota) as fast as
they are answered. Reported: beta's
median and p90 latency alone and under the flood, and how alpha's requests were answered. The flooders run in
processes of their own; on a 2-core machine they still take CPU from the server and from beta's client.
`--server-repo` runs the server from another checkout (e.g. a `git worktree` of an earlier commit) to measure before
and after.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from checkout import add_server_repo, server_env

from uniopd.launch import start_teacher
from uniopd.tiny_models import build_tiny_model

TEAMS = """teams:
  alpha: {keys: [key-alpha], tokens_per_minute: 1000}
  beta: {keys: [key-beta]}
"""


def beta_latencies(url: str, seconds: float, vocab: int) -> list[float]:
    rng = np.random.default_rng(0)
    body = {"items": [{"input_ids": rng.integers(0, vocab, 64).tolist(), "response_start": 32} for _ in range(8)]}
    out, end = [], time.monotonic() + seconds
    with httpx.Client(timeout=120, headers={"Authorization": "Bearer key-beta"}) as client:
        while time.monotonic() < end:
            start = time.perf_counter()
            client.post(f"{url}/v1/score", json=body).raise_for_status()
            out.append(time.perf_counter() - start)
    return out


def flood(url: str, stop, vocab: int, items: int, answers: multiprocessing.Queue) -> None:
    """One flooding client, in its own process (a thread would share the GIL with beta's client)."""
    seen: collections.Counter = collections.Counter()
    rng = np.random.default_rng(1)
    big = {"items": [{"input_ids": rng.integers(0, vocab, 500).tolist(), "response_start": 1} for _ in range(items)]}
    with httpx.Client(timeout=120, headers={"Authorization": "Bearer key-alpha"}) as client:
        content = httpx.Request("POST", url, json=big).content  # encoded once
        while not stop.is_set():
            try:
                resp = client.post(f"{url}/v1/score", content=content, headers={"content-type": "application/json"})
                seen[resp.status_code] += 1
            except httpx.TransportError:  # the server closed the connection before taking the whole body
                seen["closed mid-body"] += 1
    answers.put(dict(seen))


def summary(latencies: list[float]) -> str:
    ms = sorted(x * 1e3 for x in latencies)
    return f"{statistics.median(ms):.0f} / {ms[int(0.9 * (len(ms) - 1))]:.0f} ms ({len(ms)} requests)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--items", type=int, default=512, help="items of 500 tokens in each flood body")
    add_server_repo(parser)
    args = parser.parse_args()
    env = server_env(args.server_repo)
    with tempfile.TemporaryDirectory() as tmp:
        model, teams = Path(tmp) / "tiny", Path(tmp) / "teams.yaml"
        build_tiny_model(model)
        teams.write_text(TEAMS)
        serve = ["--threads", "1", "--api-keys", str(teams), "--max-body-bytes", str(8 << 20)]
        with start_teacher(model, args=serve, env=env) as server:
            vocab = httpx.get(f"{server.url}/v1/info", headers={"Authorization": "Bearer key-beta"}).json()
            vocab = vocab["vocab_size"]
            alone = beta_latencies(server.url, args.seconds, vocab)
            stop, queue = multiprocessing.Event(), multiprocessing.Queue()
            flooders = [multiprocessing.Process(target=flood, args=(server.url, stop, vocab, args.items, queue))
                        for _ in range(args.flooders)]
            for proc in flooders:
                proc.start()
            time.sleep(1.0)
            flooded = beta_latencies(server.url, args.seconds, vocab)
            stop.set()
            answers = sum((collections.Counter(queue.get()) for _ in flooders), collections.Counter())
            for proc in flooders:
                proc.join()
    print(f"teacher from {args.server_repo or os.getcwd()}; {args.flooders} flooders of {args.items}-item bodies")
    print(f"beta median / p90 alone: {summary(alone)}")
    print(f"beta median / p90 under the flood: {summary(flooded)}")
    print(f"alpha's answers: {dict(answers)}")


if __name__ == "__main__":
    main()
