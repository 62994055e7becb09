"""Peak RSS of a rollout server answering one request at its published limits.

    python bench/rollout_memory.py [--backend hf] [--prompts 4096] [--n 64] [--prompt-tokens 8] [--max-tokens 0]
                                   [--threads 2] [-- SERVER_ARGS...]

Starts `uniopd rollout serve` (uniopd's launcher) on the tiny model. Once it is ready and has answered one small
request (what a first request sets up once is not this request's), resets the server process's peak RSS
(/proc/<pid>/clear_refs), reads its VmRSS, sends one /v1/generate of `--prompts` prompts × `--n` × `--max-tokens`
(0: as many as the server's --max-request-tokens allows) with a msgpack answer, as the trainer asks, and reads its
VmHWM (/proc/<pid>/status).
Arguments after `--` go to the server (e.g. `-- --max-batch-memory-mb 256`). Reported: the status, the seconds, the
server's RSS before, its peak after, the growth, and the limits it published.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import httpx


def vm_kib(pid: int, field: str) -> int:
    """A VmRSS/VmHWM line of /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    from uniopd.launch import start_rollout
    from uniopd.tiny_models import build_tiny_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="default: a tiny qwen3 built in a temporary directory")
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    p.add_argument("--prompts", type=int, default=4096)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=0, help="0: the largest the server's limits allow")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("server_args", nargs="*", help="after --: more `uniopd rollout serve` arguments")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_tiny_model(Path(tmp) / "tiny", "qwen3")
        with start_rollout(model, args.backend, ["--threads", str(args.threads), *args.server_args],
                           log_dir=tmp, timeout=300) as server:
            pid = server.proc.pid
            limits = httpx.get(server.url + "/v1/info").json()["limits"]
            max_tokens = args.max_tokens or limits["max_request_tokens"] // (args.prompts * args.n)
            prompts = [[(7 * i + j) % 500 + 3 for j in range(args.prompt_tokens)] for i in range(args.prompts)]
            body = {"prompts": prompts, "n": args.n, "max_tokens": max_tokens, "seed": 0}
            httpx.post(server.url + "/v1/generate", json={**body, "prompts": prompts[:2]}, timeout=60)
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of this request alone
            before = vm_kib(pid, "VmRSS")
            start = time.perf_counter()
            resp = httpx.post(server.url + "/v1/generate", json=body, timeout=3600,
                              headers={"Accept": "application/x-msgpack"})
            seconds = time.perf_counter() - start
            peak = vm_kib(pid, "VmHWM")
            error = None if resp.status_code == 200 else resp.text[:300]
            alive = server.proc.poll() is None
    print(json.dumps({"backend": args.backend, "prompts": args.prompts, "n": args.n,
                      "prompt_tokens": args.prompt_tokens, "max_tokens": max_tokens,
                      "tokens": args.prompts * args.n * max_tokens, "status": resp.status_code, "error": error,
                      "server_alive": alive, "seconds": round(seconds, 1), "rss_before_mib": before >> 10,
                      "peak_mib": peak >> 10, "growth_mib": (peak - before) >> 10, "limits": limits}))


if __name__ == "__main__":
    main()
