"""A few OPD steps with every model on one device: where a step's time goes, and the trainer's GPU memory.

    python bench/train_steps.py [--device cuda] [--steps 6]

Tiny random models (the student, a math and a code teacher), both teachers and the rollout server on the
transformers backend on `--device`, the trainer in this process (accelerate puts the student on the GPU when there
is one), examples/opd-tiny's recipe (8 prompts x 4 samples a step) with an in-process score cache. Prints the last
step's time breakdown (the `time/*` metrics the trainer logs every step) and the trainer's peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import yaml

from uniopd.cli import main as uniopd
from uniopd.launch import start_rollout, start_teacher, wait_ready
from uniopd.tiny_models import build_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "opd-tiny"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="the servers' device (cpu, cuda, cuda:N)")
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    student = build_tiny_model(root / "student", "qwen3", seed=0)
    teachers = {d: build_tiny_model(root / d, "qwen3", seed=s) for d, s in (("math", 1), ("code", 2))}
    key = "bench-admin-key"
    os.environ["UNIOPD_ROLLOUT_ADMIN_KEY"] = key
    servers = {d: start_teacher(m, "hf", ["--domain", d, "--device", args.device], log_dir=root, wait=False)
               for d, m in teachers.items()}
    servers["rollout"] = start_rollout(student, "hf", ["--device", args.device], log_dir=root, wait=False,
                                       env={"UNIOPD_ADMIN_KEYS": key})
    try:
        for s in servers.values():
            wait_ready(s, timeout=300)
        tree = yaml.safe_load((EXAMPLE / "run.yaml").read_text())
        tree["student"]["model"] = str(student)
        tree["data"] = {split: [str(EXAMPLE / f"{d}_{split}.jsonl") for d in teachers] for split in ("train", "eval")}
        tree["teachers"] = {d: {"urls": [servers[d].url]} for d in teachers}
        tree["rollout"]["url"] = servers["rollout"].url
        tree["cache"]["url"] = "memory://"
        tree["schedule"] = {"steps": args.steps, "eval_every": 0, "checkpoint_every": 0}
        tree["output_dir"] = str(root / "run")
        config = root / "run.yaml"
        config.write_text(yaml.safe_dump(tree))
        uniopd(["train", "--config", str(config)])
    finally:
        for s in servers.values():
            s.stop()
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "train"][-1]
    print(f"step {last['step']} on {args.device}: " + ", ".join(
        f"{k.removeprefix('time/')} {v:.3f} s" for k, v in last.items() if k.startswith("time/")))
    if torch.cuda.is_available():
        print(f"trainer peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
