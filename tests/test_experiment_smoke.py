"""The experiment's smoke plan end to end: quick-trained experts, real teacher servers, a real rollout server and
Redis, every method and setting for two steps, then the report. The full plan is `uniopd experiment run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer.run_log import read_log
from uniopd.experiment_plan import DOMAINS, METHODS, PLANS, read_timings, student_of
from uniopd.experiment_report import write_report
from uniopd.launch import RedisServer

SMOKE = PLANS["smoke"]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory) -> dict:
    """One model cache for the module: the quick experts are trained once, by the first test that needs them."""
    return {**os.environ, "UNIOPD_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_env):
    out = tmp_path_factory.mktemp("experiment")
    doc = out / "report.md"
    cmd = [sys.executable, "-m", "uniopd", "experiment", "run", "--plan", "smoke", "--out", str(out), "--doc",
           str(doc), "--rollout-backend", "hf"]
    with RedisServer() as redis_server:
        proc = subprocess.run([*cmd, "--redis-url", redis_server.url], capture_output=True, text=True, timeout=1200,
                              env=cache_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, doc


@pytest.mark.e2e
def test_every_method_and_setting_ran_and_logged_its_metrics(smoke):
    out, _ = smoke
    for setting, method in SMOKE.runs:
        run = out / "runs" / setting / method / "seed0"
        train = read_log(run / "metrics.jsonl")
        evals = read_log(run / "metrics.jsonl", kind="eval")
        assert [r["step"] for r in train] == list(range(1, SMOKE.steps + 1)), (setting, method)
        assert [r["step"] for r in evals] == [0, SMOKE.steps]  # before training, and at the end
        assert read_log(run / "metrics.jsonl", kind="returns"), "per-rollout returns are logged"
        last = train[-1]
        domains = [d for d in DOMAINS if f"{d}/accuracy" in last]
        if method == "grpo":  # the RL baseline never calls a teacher
            assert "teacher_logprob" not in last and all(last[f"domain/{d}/scored"] == 0 for d in domains)
        else:
            assert "teacher_logprob" in last and last["masked_samples"] == 0
            assert all(last[f"domain/{d}/scored"] + last[f"domain/{d}/cached"] > 0 for d in domains)
        online = method.startswith("uniopd") and method != "uniopd-no-online"
        assert ("balance/correct_before" in last) == online, method
        assert {"calib/violation_fraction", "calib/violation_fraction_after"} <= set(last)


@pytest.mark.e2e
def test_uniopd_trains_on_the_balanced_set_and_opd_on_the_original(smoke):
    out, _ = smoke
    for setting, method in SMOKE.runs:
        config = yaml.safe_load((out / "runs" / setting / method / "seed0" / "config.yaml").read_text())
        balanced = f"balanced-{student_of(setting)}" if student_of(setting) != "student" else "balanced"
        assert all((f"/{balanced}/" in p) == METHODS[method].offline_balance for p in config["data"]["train"]), method
    hist = json.loads((out / "data" / "balanced" / "math_train.hist.json").read_text())
    assert sum(hist["before"]) == SMOKE.n_train and hist["written"] >= SMOKE.n_train
    # the multimodal student's balanced sets come from its own pass counts, images included
    visual = json.loads((out / "data" / "balanced-mm-student" / "visual_train.hist.json").read_text())
    assert sum(visual["before"]) == SMOKE.n_train
    cross = yaml.safe_load((out / "runs" / "cross-modal" / "opd" / "seed0" / "config.yaml").read_text())
    assert cross["student"]["model"].endswith("mm-student") and cross["verifiers"] == {"visual": "math"}


@pytest.mark.e2e
def test_teacher_accuracy_and_pass_counts_are_kept_beside_the_models(smoke, cache_env):
    """A demo or experiment on the same cached models and data reuses them (uniopd.experiment.Experiment.derived)."""
    out, _ = smoke
    derived = Path(cache_env["UNIOPD_CACHE"]) / "experts-quick" / "derived"
    kept = [json.loads(p.read_text()) for p in derived.glob("teacher-accuracy-*.jsonl")]
    teachers = json.loads((out / "teachers.json").read_text())
    assert sorted(map(json.dumps, kept)) == sorted(json.dumps(v) for v in teachers.values())
    counts = sorted(derived.glob("pass-counts-*.jsonl"))
    assert len(counts) == 4  # math, code; code and visual of the multimodal student
    rows = {p: p.read_text().splitlines() for p in counts}
    assert all(len(lines) == SMOKE.n_train for lines in rows.values())


@pytest.mark.e2e
def test_results_and_report_cover_every_run(smoke):
    out, doc = smoke
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {f"{s}/{m}" for s, m in SMOKE.runs}
    assert set(results["teachers"]) == {"math-teacher", "code-teacher", "strong-teacher", "visual-teacher"}
    assert set(results["balance"]) == {"math", "code", "code, mm-student", "visual, mm-student"}
    # sharpened from their students: math and code from the text student, visual from the multimodal one
    assert set(results["sharpened"]) == {"math-teacher", "code-teacher", "visual-teacher"}
    assert all(len(rounds) == 1 and rounds[0]["samples"] > 0 for rounds in results["sharpened"].values())
    text = doc.read_text()
    assert "## How the domain teachers were made" in text and "| math-teacher | 1 |" in text
    for method in {m for _, m in SMOKE.runs}:
        assert f"| {method} |" in text
    assert "## cross-modal" in text and "visual" in text
    for png in ("curves-multi-teacher.png", "returns-multi-teacher.png", "offline-balance.png",
                "curves-cross-modal.png"):
        assert (doc.parent / "report" / png).stat().st_size > 1000


@pytest.mark.e2e
def test_report_sums_the_wall_time_of_every_invocation(smoke, tmp_path):
    out, _ = smoke
    [timings] = read_timings(out / "timings.json")
    assert timings["trained"] == len(SMOKE.runs) * len(SMOKE.seeds) and timings["total_s"] > timings["prepare_s"]
    results = json.loads((out / "results.json").read_text())
    results["timings"] = [{"prepare_s": 60, "total_s": 120, "trained": 9}, {"prepare_s": 0, "total_s": 60,
                                                                            "trained": 30}]
    text = write_report(results, tmp_path / "report.md", "cmd").read_text()
    assert ("Wall time: 3.0 min in all, of which 1.0 min preparing models and data, over 2 invocations that "
            "trained 9, 30 runs.") in text
    legacy = tmp_path / "timings.json"  # written by versions that kept the last invocation only
    legacy.write_text(json.dumps({"prepare_s": 1.0, "total_s": 2.0}))
    assert read_timings(legacy) == [{"prepare_s": 1.0, "total_s": 2.0}]


@pytest.mark.slow
def test_demo_prints_before_and_after_per_domain(smoke, cache_env, tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "uniopd", "demo", "--quick", "--steps", "1", "--out", str(out),
                           "--rollout-backend", "hf", "--redis-url", "redis://127.0.0.1:1/0"],
                          capture_output=True, text=True, timeout=600, env=cache_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "not reachable" in proc.stdout  # the configured Redis is down: it says so and falls back
    table = proc.stdout[proc.stdout.index("held-out accuracy"):]
    for row in ("student before training", "after opd", "after uniopd", "teacher"):
        line = next(line for line in table.splitlines() if line.startswith(row))
        assert len(line.split()[-2:]) == 2 and all(0 <= float(x) <= 100 for x in line.split()[-2:])
    assert (out / "plots" / "accuracy.png").stat().st_size > 1000


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_stops_every_child_process(smoke, cache_env, tmp_path, how):
    proc = subprocess.Popen([sys.executable, "-m", "uniopd", "demo", "--quick", "--steps", "50", "--out",
                             str(tmp_path / "demo"), "--rollout-backend", "hf"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cache_env, start_new_session=True)
    try:
        for line in proc.stdout:  # servers, redis-server and a trainer are all running once training starts
            if "training" in line:
                break
        time.sleep(3)
        assert len(_group_members(proc.pid)) >= 5
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: SIGINT to the foreground group
        else:
            proc.terminate()  # `kill`, docker stop: SIGTERM to the demo alone, which must stop its children
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _group_members(proc.pid) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
