"""What an oversized request costs a shared teacher: the time to refuse it, and /healthz latency meanwhile.

    python bench/body_parse.py [--repeats 3] [--server-repo PATH]

A real teacher process (hf backend, a tiny model built offline) gets, one at a time, the attack bodies of issue 34:
10^6 tiny JSON items with the keys spelled with escapes (53 MB), the same items as msgpack, and 10^6 SGLang
/generate sequences; and, as the reference, a legitimate request of 512 items (the item limit) as long as the model
allows. A second thread GETs /healthz every 20 ms throughout. Reported per body: its size, the status, the seconds
to the answer and the /healthz latency (median and max) while it was handled. `--server-repo` runs the server from
another checkout (e.g. a `git worktree` of an earlier commit) to measure before and after on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import msgpack
import numpy as np
from checkout import add_server_repo, server_env

from uniopd.launch import start_teacher
from uniopd.tiny_models import build_tiny_model


def bodies(vocab: int, length: int) -> dict[str, tuple[str, str, bytes]]:
    rng = np.random.default_rng(0)
    tiny = b'{"input\\u005fids": [1, 2], "response\\u005fstart": 1}'
    item = {"input_ids": np.array([1, 2], "<i4").tobytes(), "response_start": 1}
    legit = {"items": [{"input_ids": rng.integers(0, vocab, length).tolist(), "response_start": length // 2}
                       for _ in range(512)]}
    return {
        "json 10^6 items, escaped keys": ("/v1/score", "application/json",
                                         b'{"items": [' + b",".join([tiny] * 1_000_000) + b"]}"),
        "msgpack 10^6 items": ("/v1/score", "application/msgpack", msgpack.packb({"items": [item] * 1_000_000})),
        "sglang 10^6 sequences": ("/generate", "application/json", json.dumps(
            {"input_ids": [[1, 2]] * 1_000_000, "return_logprob": True, "logprob_start_len": 1,
             "sampling_params": {"max_new_tokens": 0}}).encode()),
        f"legit 512 x {length} tokens (reference)": ("/v1/score", "application/json", json.dumps(legit).encode()),
    }


def measure(url: str, path: str, kind: str, body: bytes) -> tuple[int, float, list[float]]:
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        with httpx.Client(timeout=60) as client:
            while not done.is_set():
                start = time.perf_counter()
                client.get(f"{url}/healthz")
                probes.append(time.perf_counter() - start)
                time.sleep(0.02)

    thread = threading.Thread(target=probe)
    thread.start()
    time.sleep(0.1)
    start = time.perf_counter()
    with httpx.Client(timeout=600) as client:
        status = client.post(f"{url}{path}", content=body, headers={"content-type": kind}).status_code
    elapsed = time.perf_counter() - start
    done.set()
    thread.join()
    return status, elapsed, probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    add_server_repo(parser)
    args = parser.parse_args()
    env = server_env(args.server_repo)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        build_tiny_model(model)
        with start_teacher(model, args=["--threads", "1", "--max-batch-tokens", "4096"], env=env) as server:
            info = httpx.get(f"{server.url}/v1/info").json()
            print(f"teacher from {args.server_repo or os.getcwd()}; {args.repeats} repeats each")
            print("| body | MB | status | seconds to answer (each repeat) | /healthz median / max (ms) |")
            print("|---|---|---|---|---|")
            for name, (path, kind, body) in bodies(info["vocab_size"], info["max_length"]).items():
                runs = [measure(server.url, path, kind, body) for _ in range(args.repeats)]
                probes = [p for _, _, ps in runs for p in ps]
                seconds = " / ".join(f"{t:.2f}" for _, t, _ in runs)
                print(f"| {name} | {len(body) / 1e6:.1f} | {runs[-1][0]} | {seconds} | "
                      f"{statistics.median(probes) * 1e3:.0f} / {max(probes) * 1e3:.0f} |", flush=True)


if __name__ == "__main__":
    main()
