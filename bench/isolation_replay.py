"""Whether another team's attacks change a team's training run: the same run twice, alone and under attack.

    python bench/isolation_replay.py [--steps 60] [--out runs/isolation-replay]

Real processes on loopback: the tiny math and code teachers (hf, one thread each, a team file: team beta is the
run's; alpha, 1,000 tokens a minute, and gamma, no limits, attack), the student's rollout server, and a redis-server
with deploy/redis/users.acl. Team beta's run (examples/opd-tiny's data, `cache.url` as Redis user beta) runs
`--steps` steps alone, then again with an empty cache while alpha floods both teachers with over-quota requests from
4 processes, trickles header blocks and writes forged entries under beta's namespace as Redis user alpha, and gamma
sends 53 MB bodies of 10^6 items with escaped keys. Reported: which of the run's logged values differ between the
two runs (timings excluded), and what the attacks were answered.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis
import yaml

from uniopd.launch import RedisServer, start_rollout, start_teacher, wait_ready
from uniopd.tiny_models import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
TEAMS = """teams:
  alpha: {keys: [key-alpha], tokens_per_minute: 1000}
  beta: {keys: [key-beta]}
  gamma: {keys: [key-gamma]}
"""
# logged values that measure time, not the run, and the rollout server's count of weight pushes (the second run's
# server has taken the first run's too)
TIMINGS = ("time", "_s", "latency", "seconds", "per_s", "bytes", "weight_version")


def flood(url: str, stop, answers) -> None:
    seen: collections.Counter = collections.Counter()
    big = {"items": [{"input_ids": list(range(1, 501)), "response_start": 1}] * 64}
    with httpx.Client(timeout=120, headers={"Authorization": "Bearer key-alpha"}) as client:
        while not stop.is_set():
            try:
                seen[client.post(f"{url}/v1/score", json=big).status_code] += 1
            except httpx.TransportError:
                seen["closed"] += 1
    answers.put(dict(seen))


def big_bodies(url: str, stop, answers) -> None:
    seen: collections.Counter = collections.Counter()
    body = b'{"items": [' + b",".join([b'{"input\\u005fids": [1, 2], "response\\u005fstart": 1}'] * 1_000_000) + b"]}"
    with httpx.Client(timeout=120, headers={"Authorization": "Bearer key-gamma"}) as client:
        while not stop.is_set():
            try:
                seen[client.post(f"{url}/v1/score", content=body, headers={"content-type": "application/json"})
                     .status_code] += 1
            except httpx.TransportError:
                seen["closed"] += 1
    answers.put(dict(seen))


def trickle(url: str, stop, answers) -> None:
    port, cut = int(url.rsplit(":", 1)[1]), 0
    while not stop.is_set():
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.settimeout(0.5)
            try:
                raw.sendall(b"POST /v1/score HTTP/1.1\r\nhost: x\r\n")
                while not stop.is_set():
                    try:
                        if raw.recv(1) == b"":
                            cut += 1
                            break
                    except TimeoutError:
                        raw.sendall(b"x: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                cut += 1
    answers.put({"slow headers cut off": cut})


def forge(redis_port: int, stop, answers) -> None:
    refused = 0
    with redis.Redis(port=redis_port, username="alpha", password="change-me-alpha") as client:
        while not stop.is_set():
            try:
                client.set("uniopd:score:v2:beta:" + "0" * 64, b"\0" * 64)
            except redis.exceptions.NoPermissionError:
                refused += 1
            time.sleep(0.05)
    answers.put({"forged cache writes refused": refused})


def run_config(models: Path, math: str, code: str, rollout: str) -> dict:
    """examples/opd-tiny's run on these servers, as team beta."""
    example = ROOT / "examples" / "opd-tiny"
    run = yaml.safe_load((example / "run.yaml").read_text())
    run["student"]["model"] = str(models / "student")
    run["data"] = {split: [str(example / name) for name in files] for split, files in run["data"].items()}
    run["teachers"] = {"math": {"urls": [math], "api_key_env": "UNIOPD_TEACHER_KEY"},
                       "code": {"urls": [code], "api_key_env": "UNIOPD_TEACHER_KEY"}}
    run["rollout"]["url"] = rollout
    return run


def train(config: Path, out: Path, redis_url: str, steps: int) -> list[dict]:
    env = {**os.environ, "UNIOPD_ROLLOUT_ADMIN_KEY": "admin", "UNIOPD_TEACHER_KEY": "key-beta",
           "UNIOPD_REDIS_PASSWORD": "change-me-beta"}
    overrides = [f"output_dir={out}", f"cache.url={redis_url}", "cache.password_env=UNIOPD_REDIS_PASSWORD",
                 f"schedule.steps={steps}", "schedule.eval_every=0", f"schedule.checkpoint_every={steps}"]
    subprocess.run([sys.executable, "-m", "uniopd", "train", "--config", str(config),
                    *[a for o in overrides for a in ("--set", o)]], env=env, check=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def differences(a: list[dict], b: list[dict]) -> list[str]:
    out = []
    for row_a, row_b in zip(a, b, strict=True):
        for key in sorted(set(row_a) | set(row_b)):
            if any(t in key for t in TIMINGS):
                continue
            if row_a.get(key) != row_b.get(key):
                out.append(f"step {row_a['step']} {key}: {row_a.get(key)} vs {row_b.get(key)}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "isolation-replay")
    args = parser.parse_args()
    out = args.out.resolve()
    models = out / "models"
    for name, seed in (("student", 0), ("math-teacher", 1), ("code-teacher", 2)):
        if not (models / name / "config.json").exists():
            build_tiny_model(models / name, seed=seed)
    teams, admin = out / "teams.yaml", out / "admin.keys"
    teams.write_text(TEAMS)
    admin.write_text("admin\n")
    serve = ["--threads", "1", "--api-keys", str(teams), "--log-level", "warning"]
    cache = RedisServer(aclfile=ROOT / "deploy" / "redis" / "users.acl", admin=("admin", "change-me-admin")).start()
    math = start_teacher(models / "math-teacher", args=[*serve, "--domain", "math"], wait=False)
    code = start_teacher(models / "code-teacher", args=[*serve, "--domain", "code"], wait=False)
    rollout = start_rollout(models / "student", args=["--admin-keys", str(admin), "--log-level", "warning"],
                            wait=False)
    try:
        for server in (math, code, rollout):  # started side by side, to load at once
            wait_ready(server)
        config = out / "run.yaml"
        config.write_text(yaml.safe_dump(run_config(models, math.url, code.url, rollout.url)))
        url = f"redis://beta@127.0.0.1:{cache.port}/0"
        alone = train(config, out / "alone", url, args.steps)
        with cache.client() as c:
            c.flushall()
        stop, answers = multiprocessing.Event(), multiprocessing.Queue()
        attackers = [multiprocessing.Process(target=flood, args=(t.url, stop, answers)) for t in (math, code)
                     for _ in range(2)]
        attackers += [multiprocessing.Process(target=big_bodies, args=(code.url, stop, answers)),
                      multiprocessing.Process(target=trickle, args=(math.url, stop, answers)),
                      multiprocessing.Process(target=forge, args=(cache.port, stop, answers))]
        for proc in attackers:
            proc.start()
        try:
            attacked = train(config, out / "attacked", url, args.steps)
        finally:
            stop.set()
            seen = sum((collections.Counter(answers.get()) for _ in attackers), collections.Counter())
            for proc in attackers:
                proc.join()
        diff = differences(alone, attacked)
        print(f"{args.steps} steps, {len(alone)} logged rows; attacks answered: {dict(seen)}")
        print(f"logged values that differ (timings excluded): {len(diff)}")
        for line in diff[:20]:
            print("  " + line)
    finally:
        for server in (math, code, rollout):
            server.stop()
        cache.stop()


if __name__ == "__main__":
    main()
