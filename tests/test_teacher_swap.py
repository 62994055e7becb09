"""Teacher registry and teachers swapped by config mid-run: resolution and config errors (unit), the swapper against
real teacher processes and a real redis-server (fingerprint policy, cache isolation), and `uniopd train` runs that
swap on a file edit and on SIGHUP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from proto.client import TeacherClient
from proto.fingerprint import tokenizer_fingerprint
from tests.conftest import RedisServer, random_items
from trainer.config import ConfigError, load_config
from trainer.score_cache import ScoreCache
from trainer.teacher_router import Endpoint, FingerprintMismatch, TeacherRouter, fingerprint_id
from trainer.teacher_swap import TeacherSwapper, changed_fields
from uniopd.launch import free_port, start_rollout, start_teacher
from uniopd.tiny_models import build_tiny_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "opd-tiny"
ADMIN = "swap-admin-key"
FAST = dict(timeout_s=10.0, backoff_s=0.01)


def write_atomically(path: Path, tree: dict) -> Path:
    """How editors and deploy tools replace a file: the trainer never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(tree))
    os.replace(tmp, path)
    return path


def run_tree(student: Path, teachers: dict, *, rollout: str = "http://127.0.0.1:1", cache: str = "none",
             out: Path, steps: int = 8, **top) -> dict:
    """A math-only run on the example data, small enough that a step takes a fraction of a second."""
    tree = yaml.safe_load((EXAMPLE / "run.yaml").read_text())
    tree.update({"student": {"model": str(student)}, "data": {"train": [str(EXAMPLE / "math_train.jsonl")]},
                 "teachers": teachers, "verifiers": {"math": "math"}, "output_dir": str(out), **top})
    tree["rollout"].update(url=rollout, max_tokens=8)
    tree["cache"]["url"] = cache
    tree["algorithm"].update(prompts_per_step=2, samples_per_prompt=2, micro_batch_size=4)
    tree["schedule"] = {"steps": steps, "eval_every": 0, "checkpoint_every": 0, "eval_samples": 1}
    return tree


# --- registry resolution and config errors (unit) --------------------------------------------------------------------

DIGEST = "ab" * 32


@pytest.fixture
def registry_dir(tmp_path, tiny_model) -> Path:
    (tmp_path / "teachers").mkdir()
    write_atomically(tmp_path / "teachers" / "registry.yaml", {"teachers": {
        "math-tiny": {"urls": ["http://10.0.0.5:8101/"], "domains": ["math", "algebra"], "fingerprint": DIGEST,
                      "api_key_env": "TEAM_KEY"},
        "code-tiny": {"urls": ["http://10.0.0.6:8102", "http://10.0.0.7:8102"], "domains": ["code"]}}})
    return tmp_path


def write_run(directory: Path, tiny_model: Path, teachers: dict, **top) -> Path:
    return write_atomically(directory / "run.yaml", run_tree(tiny_model, teachers, out=directory / "out", **top))


def test_registry_teachers_resolve_relative_to_the_config_file(registry_dir, tiny_model):
    path = write_run(registry_dir, tiny_model, {"math": {"teacher": "math-tiny"}, "code": {"teacher": "code-tiny"},
                                                "algebra": {"urls": ["http://127.0.0.1:9000"]}},
                     registry="teachers/registry.yaml", verifiers={"math": "math", "code": "code", "algebra": "math"})
    c = load_config(path)
    assert c.registry == (registry_dir / "teachers" / "registry.yaml").resolve()
    math, code, algebra = c.teachers["math"], c.teachers["code"], c.teachers["algebra"]
    assert (math.teacher, math.urls, math.api_key_env, math.fingerprint) == (
        "math-tiny", ["http://10.0.0.5:8101"], "TEAM_KEY", DIGEST)
    assert (code.urls, code.fingerprint) == (["http://10.0.0.6:8102", "http://10.0.0.7:8102"], None)
    assert (algebra.teacher, algebra.urls) == (None, ["http://127.0.0.1:9000"])
    assert c.allow_teacher_change is False and c.source.path == path.resolve()


@pytest.mark.parametrize(("teachers", "top", "field"), [
    ({"math": {"teacher": "physics-huge"}}, {}, "teachers.math.teacher: 'physics-huge' is not in the registry"),
    ({"math": {"teacher": "code-tiny"}}, {}, "teachers.math.teacher: registry teacher 'code-tiny' does not serve"),
    ({"math": {"teacher": "math-tiny", "urls": ["http://127.0.0.1:1"]}}, {}, "teachers.math: give either"),
    ({"math": {"teacher": "math-tiny", "api_key_env": "X"}}, {}, "teachers.math: give either"),
    ({"math": {}}, {}, "teachers.math: give urls or teacher"),
    ({"math": {"teacher": "math-tiny"}}, {"registry": None}, "teachers.math.teacher: names a registry teacher"),
    ({"math": {"teacher": "math-tiny"}}, {"registry": "nope.yaml"}, "registry: no such file"),
    ({"math": {"urls": ["http://127.0.0.1:1"], "fingerprint": "xyz"}}, {}, "teachers.math.fingerprint"),
    ({"math": {"urls": ["http://127.0.0.1:1"]}}, {"allow_teacher_change": "maybe"}, "allow_teacher_change"),
])
def test_config_errors_name_the_field(registry_dir, tiny_model, teachers, top, field):
    path = write_run(registry_dir, tiny_model, teachers, **{"registry": "teachers/registry.yaml", **top})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(field), str(err.value)


@pytest.mark.parametrize(("entry", "field"), [
    ({"urls": ["ftp://x"], "domains": ["math"]}, "registry: .*: teachers.t.urls"),
    ({"urls": ["http://x"]}, "registry: .*: teachers.t.domains"),
    ({"urls": ["http://x"], "domains": ["math"], "fingerprint": "short"}, "registry: .*: teachers.t.fingerprint"),
    ({"urls": ["http://x"], "domains": ["math"], "port": 1}, "registry: .*: teachers.t.port"),
])
def test_invalid_registry_entries_name_the_file_and_field(tmp_path, tiny_model, entry, field):
    write_atomically(tmp_path / "registry.yaml", {"teachers": {"t": entry}})
    path = write_run(tmp_path, tiny_model, {"math": {"teacher": "t"}}, registry="registry.yaml")
    with pytest.raises(ConfigError, match=field):
        load_config(path)


def test_changed_fields_are_dotted_leaves():
    old = {"a": 1, "b": {"c": 2, "d": [1]}, "e": None}
    assert changed_fields(old, {"a": 1, "b": {"c": 3, "d": [1, 2]}, "f": 0}) == ["b.c", "b.d", "f"]
    assert changed_fields(old, old) == []


# --- real teachers ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    """Teachers A and B serve one model (one fingerprint), C another; plus the student's rollout server and Redis."""
    root = tmp_path_factory.mktemp("swap")
    math_a = build_tiny_model(root / "math-a", "qwen3", seed=1)
    math_c = build_tiny_model(root / "math-c", "qwen3", seed=3)
    starts = [lambda: start_teacher(math_a, "hf", ["--domain", "math"], log_dir=root),
              lambda: start_teacher(math_a, "hf", ["--domain", "math"], log_dir=root),
              lambda: start_teacher(math_c, "hf", ["--domain", "math"], log_dir=root),
              lambda: start_rollout(tiny_model, "hf", [], log_dir=root, env={"UNIOPD_ADMIN_KEYS": ADMIN})]
    with ThreadPoolExecutor(len(starts)) as pool:
        servers = list(pool.map(lambda start: start(), starts))
    redis_server = RedisServer().start()
    digests = {name: httpx.get(s.url + "/v1/info").json()["fingerprint"]["digest"]
               for name, s in zip("ABC", servers, strict=False)}
    yield {"A": servers[0], "B": servers[1], "C": servers[2], "rollout": servers[3], "redis": redis_server,
           "digest": digests, "student": tiny_model}
    with ThreadPoolExecutor(len(servers)) as pool:
        list(pool.map(lambda server: server.stop(), servers))
    redis_server.stop()


@pytest.fixture(scope="module")
def student_fp(tiny_model) -> str:
    from transformers import AutoTokenizer

    return tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model))


def scored_tokens(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("uniopd_scored_tokens_total")))


async def direct(server, items) -> list[np.ndarray]:
    async with TeacherClient(server.url) as client:
        return [s.logprobs for s in (await client.score(items))[1]]


async def started(config, student_fp: str, cache: ScoreCache | None = None) -> tuple[TeacherRouter, TeacherSwapper]:
    """What Trainer.connect does with the teachers: router, handshake with expected fingerprints, swapper."""
    pools = {d: [Endpoint(u) for u in p.urls] for d, p in config.teachers.items()}
    router = TeacherRouter(pools, cache, **FAST)
    try:
        await router.handshake(student_fp, expected={d: p.fingerprint for d, p in config.teachers.items()})
    except Exception:
        await router.aclose()
        raise
    swapper = TeacherSwapper(config)
    swapper.attach(router, student_fp, step=0)
    await swapper.at_step_boundary(0)  # the first boundary re-reads once (edits made during start-up)
    return router, swapper


def test_the_fingerprint_ids_are_exact_in_float32():
    assert fingerprint_id("ffffff" + "0" * 58) == 2**24 - 1 == int(np.float32(2**24 - 1))
    assert f"{fingerprint_id(DIGEST):06x}" == DIGEST[:6]


@pytest.mark.e2e
async def test_swap_to_another_teacher_is_refused_then_allowed_and_the_cache_never_serves_the_old_scores(
        stack, student_fp, tmp_path, caplog):
    A, C = stack["A"], stack["C"]
    tree = run_tree(stack["student"], {"math": {"urls": [A.url]}}, cache=stack["redis"].url, out=tmp_path / "out")
    path = write_atomically(tmp_path / "run.yaml", tree)
    router, swapper = await started(load_config(path), student_fp, ScoreCache(stack["redis"].url))
    assert swapper.metrics() == {"teachers/swaps": 0, "teachers/swap_refused": 0, "teachers/reloads": 0,
                                 "teachers/reload_errors": 0}
    items = random_items(np.random.default_rng(11), 5)
    requests = [("math", it) for it in items]
    from_a = await router.score(requests)
    assert router.metrics(reset=True)["cache/misses"] == 5

    tree["teachers"]["math"]["urls"] = [C.url]
    write_atomically(path, tree)
    with caplog.at_level(logging.INFO, logger="uniopd.train"):
        await swapper.at_step_boundary(1)
    assert swapper.metrics()["teachers/swap_refused"] == 1 and swapper.metrics()["teachers/swaps"] == 0
    refusal = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refusal) == 1 and "allow_teacher_change" in refusal[0].getMessage()
    assert router.urls("math") == [A.url] and swapper.config.teachers["math"].urls == [A.url]
    await router.score(requests)  # still teacher A: its cached scores
    m = router.metrics(reset=True)
    assert m["cache/hits"] == 5 and m["teachers/math/fingerprint"] == fingerprint_id(stack["digest"]["A"])
    await swapper.at_step_boundary(2)  # no file change, no SIGHUP: the refused swap is not retried every step
    assert swapper.metrics()["teachers/reloads"] == 1

    tree["allow_teacher_change"] = True
    write_atomically(path, tree)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="uniopd.train"):
        await swapper.at_step_boundary(3)
    assert swapper.metrics()["teachers/swaps"] == 1 and router.urls("math") == [C.url]
    assert any(r.levelno == logging.INFO and "swapped" in r.getMessage() for r in caplog.records)
    before = scored_tokens(C)
    from_c = await router.score(requests)  # the same sequences: A's entries must not answer for C
    m = router.metrics(reset=True)
    assert (m["cache/hits"], m["cache/misses"]) == (0, 5)
    assert scored_tokens(C) - before == sum(len(it.input_ids) - it.response_start for it in items)
    for got, want, old in zip(from_c, await direct(C, items), from_a, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        assert not np.allclose(got, old, atol=1e-3)
    assert m["teachers/math/fingerprint"] == fingerprint_id(stack["digest"]["C"])
    assert f"endpoint/{A.url}/calls" not in m  # the old replica is gone (and its client closed)
    record = json.loads((tmp_path / "out" / "teachers.json").read_text())
    assert record["step"] == 3 and record["teachers"]["math"]["fingerprint"] == stack["digest"]["C"]
    swapper.close()
    await router.aclose()


@pytest.mark.e2e
async def test_replace_pool_keeps_a_replica_another_domain_still_uses(stack, student_fp):
    A, C = stack["A"], stack["C"]
    router = TeacherRouter({"math": [Endpoint(A.url)], "algebra": [Endpoint(A.url)]}, **FAST)
    await router.handshake(student_fp)
    info = await router.probe("algebra", [Endpoint(C.url)], student_fp)
    await router.replace_pool("algebra", [Endpoint(C.url)], info)
    items = random_items(np.random.default_rng(12), 2)
    got = await router.score([("math", items[0]), ("algebra", items[1])])
    np.testing.assert_allclose(got[0], (await direct(A, items[:1]))[0], atol=1e-5)  # A's client is still open
    np.testing.assert_allclose(got[1], (await direct(C, items[1:]))[0], atol=1e-5)
    assert router.info("algebra").fingerprint.digest == stack["digest"]["C"]
    await router.replace_pool("math", [Endpoint(C.url)], info)
    assert {k for k in router.metrics() if k.endswith("/calls")} == {f"endpoint/{C.url}/calls"}
    await router.aclose()


@pytest.mark.e2e
async def test_registry_pins_the_fingerprint_at_start_and_at_a_swap(stack, student_fp, tmp_path, caplog):
    A, B, C = stack["A"], stack["B"], stack["C"]
    registry = {"teachers": {"math-tiny": {"urls": [A.url], "domains": ["math"],
                                           "fingerprint": stack["digest"]["A"][:12]}}}
    write_atomically(tmp_path / "registry.yaml", registry)
    tree = run_tree(stack["student"], {"math": {"teacher": "math-tiny"}}, out=tmp_path / "out",
                    registry="registry.yaml", allow_teacher_change=True)
    path = write_atomically(tmp_path / "run.yaml", tree)
    wrong = write_atomically(tmp_path / "wrong.yaml", {"teachers": {"math-tiny": {
        **registry["teachers"]["math-tiny"], "fingerprint": stack["digest"]["C"]}}})
    with pytest.raises(FingerprintMismatch, match="'math'.*expects " + stack["digest"]["C"]):
        await started(load_config(path, [f"registry={wrong}"]), student_fp)

    router, swapper = await started(load_config(path), student_fp)
    registry["teachers"]["math-tiny"]["urls"] = [C.url]  # moved to another model: the pin refuses it
    write_atomically(tmp_path / "registry.yaml", registry)
    with caplog.at_level(logging.ERROR, logger="uniopd.train"):
        await swapper.at_step_boundary(1)
    assert swapper.metrics()["teachers/swap_refused"] == 1 and router.urls("math") == [A.url]
    assert "failed the handshake" in caplog.text and "expects " + stack["digest"]["A"][:12] in caplog.text

    registry["teachers"]["math-tiny"]["urls"] = [f"http://127.0.0.1:{free_port()}"]  # nobody there
    write_atomically(tmp_path / "registry.yaml", registry)
    await swapper.at_step_boundary(2)
    assert swapper.metrics()["teachers/swap_refused"] == 2 and router.urls("math") == [A.url]

    registry["teachers"]["math-tiny"]["urls"] = [B.url, A.url]  # another replica of the pinned teacher
    write_atomically(tmp_path / "registry.yaml", registry)
    await swapper.at_step_boundary(3)
    assert swapper.metrics()["teachers/swaps"] == 1 and router.urls("math") == [B.url, A.url]

    tree["seed"] = 7  # not live: warned about, ignored; the teachers are unchanged
    write_atomically(path, tree)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="uniopd.train"):
        await swapper.at_step_boundary(4)
    assert "seed changed" in caplog.text and swapper.config.seed == 0
    assert swapper.metrics()["teachers/swaps"] == 1 and swapper.metrics()["teachers/reloads"] == 4

    path.write_text("teachers: [")  # a broken edit: logged, counted, the run keeps its teachers
    await swapper.at_step_boundary(5)
    assert swapper.metrics()["teachers/reload_errors"] == 1 and router.urls("math") == [B.url, A.url]
    await router.aclose()


# --- `uniopd train` ---------------------------------------------------------------------------------------------------


def rows_of(out: Path) -> list[dict]:
    """Complete train rows written so far (the run may be mid-write)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [r for r in (json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n"))
            if r["kind"] == "train"]


class Run:
    """`uniopd train` as a child process whose metrics the test watches."""

    def __init__(self, config: Path, out: Path) -> None:
        self.out, self.stderr = out, out.with_suffix(".stderr")
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "uniopd", "train", "--config", str(config)],
                                         stdout=subprocess.DEVNULL, stderr=err,
                                         env={**os.environ, "UNIOPD_ROLLOUT_ADMIN_KEY": ADMIN})

    def wait_for(self, what: str, predicate, timeout: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not predicate(rows := rows_of(self.out)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"the run ended before {what}:\n{self.stderr.read_text()[-4000:]}")
            time.sleep(0.02)
        return rows

    def finish(self) -> list[dict]:
        assert self.proc.wait(120) == 0, self.stderr.read_text()[-4000:]
        return rows_of(self.out)


def first_row(rows: list[dict], key: str, value: float) -> dict:
    return next(r for r in rows if r[key] == value)


@pytest.mark.e2e
def test_run_swaps_teachers_on_a_file_edit_and_on_sighup(stack, tmp_path):
    A, B = stack["A"], stack["B"]
    out = tmp_path / "swap"
    steps = 60  # long enough that the run is still going after the 0.5 s wait below (a step takes ~0.1 s)
    tree = run_tree(stack["student"], {"math": {"urls": [A.url]}}, rollout=stack["rollout"].url,
                    cache=stack["redis"].url, out=out, seed=1, steps=steps)
    path = write_atomically(tmp_path / "swap.yaml", tree)
    run = Run(path, out)
    run.wait_for("step 1", lambda rows: len(rows) >= 1)
    b_before = scored_tokens(B)
    tree["teachers"]["math"]["urls"] = [B.url]  # same model, same fingerprint: accepted
    write_atomically(path, tree)
    rows = run.wait_for("the swap to B", lambda rows: any(r["teachers/swaps"] == 1 for r in rows))
    a_after_swap, b_after_swap = scored_tokens(A), scored_tokens(B)

    # Back to A by SIGHUP alone: the edit keeps size, inode and mtime, so only the signal makes the trainer look.
    text, stat = path.read_text(), path.stat()
    edited = text.replace(B.url, A.url)
    assert len(edited) == len(text)
    path.write_text(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    time.sleep(0.5)  # a few step boundaries: nothing may happen without the signal
    assert all(r["teachers/swaps"] == 1 for r in rows_of(out)[len(rows):])
    assert scored_tokens(A) == a_after_swap  # A got no new work while B was the teacher
    run.proc.send_signal(signal.SIGHUP)
    run.wait_for("the SIGHUP swap back to A", lambda rows: any(r["teachers/swaps"] == 2 for r in rows))
    b_final = scored_tokens(B)
    rows = run.finish()
    stderr = run.stderr.read_text()

    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    to_b, to_a = first_row(rows, "teachers/swaps", 1), first_row(rows, "teachers/swaps", 2)
    assert 2 <= to_b["step"] < to_a["step"] <= steps
    assert to_a["teachers/reloads"] == 2 and rows[-1]["teachers/swap_refused"] == 0
    fp = fingerprint_id(stack["digest"]["A"])
    assert all(r["teachers/math/fingerprint"] == fp for r in rows)  # B is the same teacher
    for r in rows:  # each step's math samples went to the teacher the config named at its start
        on_b = to_b["step"] <= r["step"] < to_a["step"]
        assert r.get(f"endpoint/{B.url if on_b else A.url}/calls", 0) > 0, r["step"]
        assert f"endpoint/{A.url if on_b else B.url}/calls" not in r, r["step"]
        assert r["masked_samples"] == 0
    assert b_after_swap > b_before and scored_tokens(B) == b_final  # B served after the swap, not after SIGHUP
    assert f"re-reading {path}" in stderr and "(SIGHUP)" in stderr and stderr.count("swapped to") == 2
    record = json.loads((out / "teachers.json").read_text())
    assert record["teachers"]["math"]["urls"] == [A.url] and record["step"] == to_a["step"] - 1


@pytest.mark.e2e
def test_run_refuses_a_different_teacher_until_allowed(stack, tmp_path):
    A, C = stack["A"], stack["C"]
    out = tmp_path / "change"
    registry = {"teachers": {"math-tiny": {"urls": [A.url], "domains": ["math"]}}}  # not pinned
    write_atomically(tmp_path / "registry.yaml", registry)
    tree = run_tree(stack["student"], {"math": {"teacher": "math-tiny"}}, rollout=stack["rollout"].url,
                    cache=stack["redis"].url, out=out, seed=2, registry="registry.yaml", steps=60)
    path = write_atomically(tmp_path / "change.yaml", tree)
    run = Run(path, out)
    run.wait_for("step 1", lambda rows: len(rows) >= 1)
    registry["teachers"]["math-tiny"]["urls"] = [C.url]  # the registry now points at another model
    write_atomically(tmp_path / "registry.yaml", registry)
    run.wait_for("the refusal", lambda rows: any(r["teachers/swap_refused"] == 1 for r in rows))
    c_before = scored_tokens(C)
    tree["allow_teacher_change"] = True
    write_atomically(path, tree)
    run.wait_for("the allowed swap", lambda rows: any(r["teachers/swaps"] == 1 for r in rows))
    rows = run.finish()
    stderr = run.stderr.read_text()

    refused, swapped = first_row(rows, "teachers/swap_refused", 1), first_row(rows, "teachers/swaps", 1)
    assert 2 <= refused["step"] < swapped["step"]
    old, new = fingerprint_id(stack["digest"]["A"]), fingerprint_id(stack["digest"]["C"])
    for r in rows:
        on_c = r["step"] >= swapped["step"]
        assert r["teachers/math/fingerprint"] == (new if on_c else old)
        assert r.get(f"endpoint/{C.url if on_c else A.url}/calls", 0) > 0, r["step"]
        assert r["domain/math/scored"] == r["math/samples"]  # the run went on, fully scored, through the refusal
    assert scored_tokens(C) > c_before
    assert "ERROR" in stderr and "allow_teacher_change" in stderr and "swapped to teacher 'math-tiny'" in stderr
