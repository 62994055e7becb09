"""Peak RSS of each trainer process on CPU: one process, two with DDP, two with FSDP2
(configs/accelerate/fsdp2-cpu.yaml), for the tiny student and a 76.6M-parameter one (hidden 1024, 8 layers).

    python bench/train_memory.py            # ~10 min on 2 cores

Each run is `uniopd train` on examples/opd-tiny for 3 steps of 8 samples (micro-batch 4, 12-token responses) and a
checkpoint, against real teacher, rollout and Redis processes. Every trainer process starts through a launcher
(torchrun for one process and DDP, `accelerate launch` for FSDP2) with OMP_NUM_THREADS=1 and reports getrusage's
ru_maxrss when it exits. The model state (fp32 weights and gradients, Adam's m and v) is 16 bytes a parameter.
"""

from __future__ import annotations

import atexit
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-key"
STUDENTS = {"tiny": {}, "76.6M": {"hidden": 1024, "layers": 8, "init_range": 0.02}}


def launchers() -> dict[str, list[str]]:
    from uniopd.launch import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(free_port()), "--nproc_per_node"]
    return {"1 process": [*torchrun, "1"], "2 processes, DDP": [*torchrun, "2"],
            "2 processes, FSDP2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                   str(ROOT / "configs" / "accelerate" / "fsdp2-cpu.yaml"),
                                   "--main_process_port", str(free_port())]}


def run_settings(student: Path, out: Path, teachers: dict, rollout, redis) -> list[str]:
    sets = {"student.model": student, "output_dir": out, "rollout.url": rollout.url, "rollout.max_tokens": 12,
            "cache.url": redis.url, "algorithm.prompts_per_step": 4, "algorithm.samples_per_prompt": 2,
            "algorithm.micro_batch_size": 4, "schedule.steps": 3, "schedule.checkpoint_every": 3,
            "schedule.eval_every": 0, **{f"teachers.{d}.urls": f"[{s.url}]" for d, s in teachers.items()}}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


def main() -> None:
    from safetensors.torch import load_file

    from uniopd.launch import RedisServer, start_rollout, start_teacher
    from uniopd.tiny_models import build_tiny_model

    root = Path(tempfile.mkdtemp(prefix="train-memory-"))
    redis = RedisServer().start()
    teachers = {d: start_teacher(build_tiny_model(root / d, "qwen3", seed=seed), "hf", ["--domain", d], log_dir=root)
                for d, seed in (("math", 1), ("code", 2))}
    print("| student | parameters | state (16 B/param) | launch | peak RSS per process (rank 0 / 1) |")
    print("|---|---|---|---|---|")
    try:
        for name, size in STUDENTS.items():
            student = build_tiny_model(root / name, "qwen3", seed=0, **size)
            params = sum(t.numel() for t in load_file(student / "model.safetensors").values())
            rollout = start_rollout(student, "hf", [], log_dir=root, env={"UNIOPD_ADMIN_KEYS": ADMIN})
            try:
                for i, (label, launch) in enumerate(launchers().items()):
                    out = root / f"{name}-run{i}"
                    cmd = [*launch, __file__, "train", "--config", str(ROOT / "examples" / "opd-tiny" / "run.yaml"),
                           *run_settings(student, out, teachers, rollout, redis)]
                    env = {**os.environ, "UNIOPD_ROLLOUT_ADMIN_KEY": ADMIN, "OMP_NUM_THREADS": "1",
                           **({"ACCELERATE_USE_CPU": "true"} if "DDP" in label else {})}  # DDP over gloo
                    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
                    if done.returncode:
                        raise SystemExit(done.stderr[-3000:])
                    peaks = [m for _, m in sorted(re.findall(r"PEAK_RSS rank=(\d+) MiB=(\d+)", done.stderr))]
                    print(f"| {name} | {params / 1e6:.2f}M | {16 * params / 2**20:.0f} MiB | {label} | "
                          f"{' / '.join(peaks)} MiB |", flush=True)
            finally:
                rollout.stop()
    finally:
        for s in teachers.values():
            s.stop()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)  # GBs of checkpoints


def trainer_process(args: list[str]) -> None:
    """`uniopd ARGS` in this process (as launched), printing its peak RSS at exit."""
    from uniopd.cli import main as uniopd

    def report() -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10  # KiB on Linux
        print(f"PEAK_RSS rank={os.environ.get('RANK', '0')} MiB={peak}", file=sys.stderr, flush=True)

    atexit.register(report)
    uniopd(args)


if __name__ == "__main__":
    if sys.argv[1:]:
        trainer_process(sys.argv[1:])
    else:
        main()
