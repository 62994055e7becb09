"""Time of a weight push to a vLLM rollout server: the safetensors push over HTTP against vLLM's weight-transfer
engine over gloo (rollout.weight_sync http / gloo), for generated models of several sizes.

    python bench/weight_push.py [--sizes 128x4 512x4 1024x8 2048x8] [--repeats 3]

Each size (hidden x layers, uniopd.tiny_models.build_tiny_model; fp32) gets one rollout server (`--backend vllm
--weight-transfer gloo`) on loopback, and each push is timed as the trainer's main process sees it, from its model
to the server's answer that the new weights sample: http = gathered_safetensors + POST /v1/weights (serialize,
upload, the server's spool, read, checks and vLLM reload); gloo = EngineSync.push (the control plane, the
broadcast into vLLM's layerwise reload, finish). The gloo group is formed once (`init`, reported apart), as a
training run does. Reported: median seconds over repeats and MB/s (model bytes / seconds), so seconds per GB can be
extrapolated. Trainer and server share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from proto.client import RolloutClient
from trainer.config import RolloutConfig
from trainer.sharding import gathered_safetensors
from trainer.weight_sync import EngineSync
from uniopd.launch import start_rollout
from uniopd.tiny_models import build_tiny_model

ADMIN = "bench-admin"


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def http_push(url: str, model) -> None:
    async def go():
        async with RolloutClient(url, admin_key=ADMIN) as client:
            await client.push_weights(gathered_safetensors(model, keep=True))

    asyncio.run(go())


def measure(hidden: int, layers: int, repeats: int, workdir: Path) -> dict:
    model_dir = build_tiny_model(workdir / f"h{hidden}-l{layers}", "qwen3", seed=1, hidden=hidden, layers=layers)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    (workdir / "admin").write_text(ADMIN)
    args = ["--admin-keys", str(workdir / "admin"), "--weight-transfer", "gloo"]
    with start_rollout(model_dir, "vllm", args, log_dir=workdir, timeout=600) as server:
        http = median_s(lambda: http_push(server.url, model), repeats)
        sync = EngineSync(RolloutConfig(url=server.url, weight_sync="gloo"), model, rank=0, admin_key=ADMIN)
        start = time.perf_counter()
        sync.connect()
        init = time.perf_counter() - start
        gloo = median_s(sync.push, repeats)
        sync.close()
    return {"model": f"{hidden}x{layers}", "mb": size / 1e6, "http": http, "gloo": gloo, "init": init}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["128x4", "512x4", "1024x8", "2048x8"], help="hidden x layers")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| model (hidden x layers) | MB (fp32) | http push s | http MB/s | gloo s | gloo MB/s | gloo init s |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.sizes:
            hidden, layers = (int(x) for x in spec.split("x"))
            r = measure(hidden, layers, args.repeats, Path(tmp))
            print(f"| {r['model']} | {r['mb']:.1f} | {r['http']:.3f} | {r['mb'] / r['http']:.0f} | {r['gloo']:.3f} | "
                  f"{r['mb'] / r['gloo']:.0f} | {r['init']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
