"""The miniature reproduction (and the demo, a small plan of it): settings × methods × seeds on the trained tiny
experts, each run a real `uniopd train` against real teacher servers, a real rollout server and Redis started here.

Layout of an experiment directory:
    data/                 train / held-out jsonl, data/balanced/ the offline-balanced training sets (+ histograms)
    teachers.json         held-out accuracy of every teacher model, served as a sampler with the student's protocol
    runs/<setting>/<method>/seed<k>/   config.yaml, metrics.jsonl, done.json (a finished run is never redone)
    results.json          everything the report needs (uniopd.experiment_report)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from proto.fingerprint import model_revision
from trainer.config import set_dotted
from uniopd import expert_models
from uniopd.experiment_plan import METHODS, SETTINGS, Plan, balanced_dir, is_done, read_timings, run_dir, student_of
from uniopd.experiment_report import collect
from uniopd.launch import RedisServer, ServerProcess, die_with_parent, start_rollout, start_teacher, wait_ready
from uniopd.synthetic.datasets import VERIFIER_OF, write_datasets

log = logging.getLogger("uniopd.experiment")
ADMIN_ENV = "UNIOPD_ROLLOUT_ADMIN_KEY"
VERIFIERS = Path(__file__).resolve().parents[1] / "trainer" / "verifiers"  # what decides a verdict
# Teachers score at the same moment (a step's rollouts go to every domain's teacher at once) while the trainer computes
# π_old: with torch's default of a thread per core each, they oversubscribe a small machine (issue 18 measured a
# teacher call ~30x slower than on an idle server); one thread each splits the cores between them.
TEACHER_THREADS = 1


def models_root(cache: Path, quick: bool) -> Path:
    """Quick models live apart from the full ones, so neither evicts the other from the cache."""
    return cache / ("experts-quick" if quick else "experts")


def prepare_models(root: Path, names: list[str], quick: bool = False) -> dict[str, Path]:
    """Train (or reuse) the named models under root/models/."""
    specs = [expert_models.SPECS[n].scaled(expert_models.QUICK_FACTOR) if quick else expert_models.SPECS[n]
             for n in names]
    if todo := [s.name for s in specs if not expert_models.is_current(s, root)]:
        print(f"training {', '.join(todo)} (once; cached under {root})", flush=True)
    return expert_models.ensure_models(specs, root)


def resolve_redis(url: str | None, stack: ExitStack) -> str:
    """The configured Redis if it answers, else a redis-server launched here, else the in-process cache."""
    import redis

    from trainer.score_cache import MEMORY_URL

    if url:
        try:
            with redis.Redis.from_url(url, socket_timeout=2) as client:
                client.ping()
            return url
        except redis.RedisError as exc:
            print(f"Redis at {url} is not reachable ({exc}); falling back", flush=True)
    if shutil.which("redis-server"):
        return stack.enter_context(RedisServer()).url
    print("No Redis configured and no redis-server installed: teacher scores are cached in-process only "
          "(install redis-server, or pass --redis-url, to share them across runs)", flush=True)
    return MEMORY_URL


class Experiment:
    """Starts the shared servers once; every run is a `uniopd train` subprocess against them."""

    def __init__(self, plan: Plan, out: Path, cache: Path, teacher_backend: str = "hf",
                 rollout_backend: str = "hf", redis_url: str | None = None) -> None:
        self.plan, self.out, self.cache = plan, out.resolve(), cache  # configs hold absolute paths
        self.teacher_backend, self.rollout_backend, self.redis_url = teacher_backend, rollout_backend, redis_url
        self.logs = out / "logs"

    def run(self) -> dict:
        p = self.plan
        self.logs.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.models = prepare_models(models_root(self.cache, p.quick_models), [*p.students, *p.teachers],
                                     p.quick_models)
        self.record_sharpening()
        self.data = write_datasets(self.out / "data", 0, p.n_train, p.n_eval, domains=tuple(p.domains))
        timings = {"prepare_s": time.perf_counter() - t0, "trained": sum(
            not is_done(self.out, s, m, seed) for s, m in p.runs for seed in p.seeds)}
        with ExitStack() as stack:
            self.redis = resolve_redis(self.redis_url, stack)
            key = secrets.token_hex(16)
            keys = self.out / "admin-keys"
            keys.write_text(key + "\n")
            keys.chmod(0o600)
            os.environ[ADMIN_ENV] = key
            # every server loads at once (each waits on its own imports and model load), then all are waited for
            teachers = {name: stack.enter_context(start_teacher(
                self.models[name], self.teacher_backend,
                [*(a for d in p.domains_of(name) for a in ("--domain", d)), "--threads", str(TEACHER_THREADS)],
                self.logs, wait=False)) for name in p.teachers}
            rollouts = {student: stack.enter_context(start_rollout(
                self.models[student], self.rollout_backend, ["--admin-keys", str(keys)], self.logs, wait=False))
                for student in p.students}
            for server in [*teachers.values(), *rollouts.values()]:
                wait_ready(server)
            self.teacher_urls = {name: server.url for name, server in teachers.items()}
            self.rollout_urls = {student: server.url for student, server in rollouts.items()}
            self.teacher_accuracy()
            self.offline_balance()
            for setting, method in p.runs:
                for seed in p.seeds:
                    self.train(setting, method, seed)
        timings["total_s"] = time.perf_counter() - t0
        path = self.out / "timings.json"  # one entry per invocation: an experiment may be run in several
        path.write_text(json.dumps([*read_timings(path), timings], indent=1))
        results = collect(self.out, self.plan)
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        return results

    # ---- pieces ----------------------------------------------------------------------------------------------

    def config(self, setting: str, method: str, seed: int, run_dir: Path) -> dict:
        p, m = self.plan, METHODS[method]
        teachers, student = SETTINGS[setting], student_of(setting)
        train_dir = balanced_dir(self.out, student) if m.offline_balance else self.out / "data"
        tree = {
            "student": {"model": str(self.models[student])},
            "data": {"train": [str(train_dir / f"{d}_train.jsonl") for d in teachers],
                     "eval": [str(self.data[f"{d}_eval"]) for d in teachers]},
            "teachers": {d: {"urls": [self.teacher_urls[t]]} for d, t in teachers.items()},
            "verifiers": {d: VERIFIER_OF[d] for d in teachers if d in VERIFIER_OF},
            "rollout": {"url": self.rollout_urls[student], "admin_key_env": ADMIN_ENV, "max_tokens": p.max_tokens},
            "cache": {"url": self.redis},
            "algorithm": {"samples_per_prompt": p.samples_per_prompt, "prompts_per_step": p.prompts_per_step,
                          "lr": p.lr, "warmup_steps": 2, "micro_batch_size": 64},
            "schedule": {"steps": p.steps, "eval_every": p.eval_every, "checkpoint_every": 0,
                         "eval_samples": p.eval_samples, "log_returns": True},
            "output_dir": str(run_dir),
            "seed": seed,
        }
        for dotted, value in m.overrides.items():
            set_dotted(tree, dotted, value)
        return tree

    def train(self, setting: str, method: str, seed: int) -> None:
        if is_done(self.out, setting, method, seed):
            return
        run = run_dir(self.out, setting, method, seed)
        if run.exists():
            shutil.rmtree(run)  # an interrupted run starts over: its partial log would skew the curves
        run.mkdir(parents=True)
        config = run / "config.yaml"
        config.write_text(yaml.safe_dump(self.config(setting, method, seed, run), sort_keys=False))
        print(f"[{setting} / {method} / seed {seed}] training {self.plan.steps} steps", flush=True)
        start = time.perf_counter()
        with (run / "train.log").open("wb") as out:
            proc = subprocess.run([sys.executable, "-m", "uniopd", "train", "--config", str(config)], stdout=out,
                                  stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
        if proc.returncode != 0:
            tail = (run / "train.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{setting}/{method}/seed{seed} failed ({proc.returncode}):\n{tail}")
        (run / "done.json").write_text(json.dumps({"wall_s": time.perf_counter() - start}))

    def derived(self, kind: str, *inputs: object) -> Path:
        """Where a result computed only from cached models and data is kept beside the models, named by everything
        it was computed from (model weights, data files, sampling settings, the verifiers' code), so a demo or
        experiment on a cached model reuses it and any change recomputes it."""
        h = hashlib.sha256(kind.encode())
        for source in sorted(VERIFIERS.glob("*.py")):
            h.update(source.read_bytes())
        for x in inputs:
            if isinstance(x, Path):
                x = model_revision(x) if x.is_dir() else hashlib.sha256(x.read_bytes()).hexdigest()
            h.update(b"\0" + str(x).encode())
        path = models_root(self.cache, self.plan.quick_models) / "derived" / f"{kind}-{h.hexdigest()[:24]}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def record_sharpening(self) -> None:
        """How each sharpened teacher was made (uniopd.sharpen's per-round log): the RL-side baseline of the report's
        steps-to-teacher-level comparison."""
        made = {name: json.loads(path.read_text()) for name in self.plan.teachers
                if (path := self.models[name] / "sharpen.json").exists()}
        (self.out / "sharpened.json").write_text(json.dumps(made, indent=1))

    def offline_balance(self) -> None:
        """One balanced training set per (student, domain), from the initial student's pass counts (shared by all
        runs of that student)."""
        from trainer.config import load_config
        from trainer.offline_balance import run_offline_balance

        p = self.plan
        for student in p.students:
            settings = [s for s, m in p.runs if student_of(s) == student and METHODS[m].offline_balance]
            if not settings:
                continue
            widest = max(settings, key=lambda s: len(SETTINGS[s]))  # its config names a teacher for every domain
            out_dir = balanced_dir(self.out, student)
            out_dir.mkdir(parents=True, exist_ok=True)
            config_path = out_dir / "balance.yaml"
            config_path.write_text(yaml.safe_dump(self.config(widest, "opd", 0, out_dir)))
            config = load_config(config_path)
            for domain in SETTINGS[widest]:
                target = out_dir / f"{domain}_train.jsonl"
                if not target.exists():
                    # the pass counts are the student's, on this data: resumed from (and kept in) the model cache
                    known = self.derived("pass-counts", self.models[student], self.data[f"{domain}_train"],
                                         p.balance_samples, config.seed, p.max_tokens, self.rollout_backend)
                    progress = target.with_suffix(".progress.jsonl")
                    if known.exists():
                        shutil.copyfile(known, progress)
                    print(f"offline balancing: {domain} pass counts from {p.balance_samples} {student} samples",
                          flush=True)
                    asyncio.run(run_offline_balance(config, self.data[f"{domain}_train"], target,
                                                    p.balance_samples, cap=8))
                    shutil.copyfile(progress, known)

    def teacher_accuracy(self) -> None:
        """Each teacher model served as a sampler, held-out accuracy over the plan's seeds (same k, T=1, top-p 1)."""
        path = self.out / "teachers.json"
        result = json.loads(path.read_text()) if path.exists() else {}
        p = self.plan
        for name in p.teachers:
            if name in result:
                continue
            domains = p.domains_of(name)
            known = self.derived("teacher-accuracy", self.models[name], *(self.data[f"{d}_eval"] for d in domains),
                                 p.seeds, p.eval_samples, p.max_tokens, self.rollout_backend)
            if known.exists():
                result[name] = json.loads(known.read_text())
                print(f"held-out accuracy of {name}: measured before on these weights and data ({known})",
                      flush=True)
            else:
                print(f"held-out accuracy of {name} ({', '.join(domains)})", flush=True)
                with start_rollout(self.models[name], self.rollout_backend, [], self.logs) as server:
                    result[name] = asyncio.run(self._accuracy(server, name, domains))
                known.write_text(json.dumps(result[name]))
            path.write_text(json.dumps(result, indent=1))

    async def _accuracy(self, server: ServerProcess, name: str, domains: list[str]) -> dict[str, list[float]]:
        from transformers import AutoTokenizer

        from proto.client import RolloutClient
        from trainer.data import derive_seed, load_records, render_prompt
        from trainer.evaluation import heldout_accuracy

        tokenizer = AutoTokenizer.from_pretrained(self.models[name])
        records = load_records([self.data[f"{d}_eval"] for d in domains])
        prompts = [render_prompt(tokenizer, r) for r in records]
        per_seed: dict[str, list[float]] = {}
        async with RolloutClient(server.url) as client:
            for seed in self.plan.seeds:
                acc = await heldout_accuracy(client, tokenizer, lambda d: VERIFIER_OF.get(d, d), prompts, records,
                                             self.plan.eval_samples, derive_seed(seed, 0, "eval"),
                                             self.plan.max_tokens)
                for key, value in acc.items():
                    per_seed.setdefault(key, []).append(value)
        return per_seed
