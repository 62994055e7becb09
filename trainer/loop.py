"""The training run: one OPD step per docs/method.md §5, checkpoints, evaluation, metrics.

Step: prompts → rollouts (rollout server) → [verify ‖ teacher scores (router + cache) ‖ π_old recompute] → a collated
Batch → the estimator's advantages → the Uni-OPD recipe → clipped PG update(s) → push weights → log. Verification,
scoring and the π_old forward pass overlap (with top-k supervision the scoring follows π_old, whose candidates the
teacher scores, and verification runs beside both). When the update is one micro-batch, π_old's forward pass is kept
with its graph and is the update's: one student pass a step instead of two. The math lives in pure modules; the
Trainer keeps I/O, the distributed work and the optimizer.

Several processes (`accelerate launch`, DDP or FSDP2): the main process does all network work (sampling,
verification, teacher scoring, weight pushes, logging) and broadcasts the rollouts and their scores; every process
recomputes π_old for and trains on its own share of each minibatch, and DDP (or FSDP2's reduce-scatter) averages the
gradients, so the update equals the single-process one. Every process runs the same number of forward passes, which
FSDP2's all-gathers need.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import defaultdict
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from modeling.loading import from_pretrained
from modeling.logprobs import ResponseLogprobs
from modeling.multimodal import Vision, is_multimodal
from proto.client import RolloutClient, generate_request
from proto.fingerprint import tokenizer_fingerprint
from proto.schemas import ScoreItem
from proto.validation import score_item_problem
from trainer.batch import Batch, Rollout, batch_metrics, collate
from trainer.checkpoint import Progress, load_latest, save_checkpoint
from trainer.config import ConfigError, RunConfig
from trainer.data import DataStream, Example, derive_seed, load_records, make_examples
from trainer.estimators import ESTIMATORS, LossRows, LossSpec
from trainer.evaluation import heldout_accuracy, verify_responses
from trainer.opd import trajectory_returns
from trainer.recipe import RecipeOutput, uni_opd
from trainer.rollout_session import RolloutSession
from trainer.run_log import RunLog
from trainer.score_cache import ScoreCache
from trainer.sharding import accelerator, gathered_safetensors
from trainer.student import response_prefill
from trainer.teacher_router import Endpoint, TeacherRouter, TokenizerMismatch
from trainer.teacher_swap import TeacherSwapper
from trainer.timing import teacher_wait, timed, timed_await
from trainer.weight_sync import EngineSync

log = logging.getLogger("uniopd.train")


class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False) -> None:
        from transformers import AutoTokenizer

        self.config = c = config
        self.accelerator = accelerator()
        torch.manual_seed(c.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(c.student.model)
        model = from_pretrained(c.student.model, c.student.dtype)
        self.vision = Vision(c.student.model) if is_multimodal(c.student.model) else None
        a = c.algorithm
        self.estimator, self.recipe = ESTIMATORS[a.estimator, a.teacher_signal], c.recipe.spec()
        self.loss_spec = LossSpec(a.clip_low, a.clip_high, a.logprob_clip)
        optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
        warmup = max(1, a.warmup_steps * a.updates_per_batch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # not prepared: accelerate would step it once per process; registered so checkpoints still hold it
        self.scheduler = scheduler
        self.accelerator.register_for_checkpointing(scheduler)
        domains = set(c.teachers)
        self.examples = make_examples(self.tokenizer, load_records(c.data.train, domains))
        self.eval_examples = make_examples(self.tokenizer, load_records(c.data.eval, domains)) if c.data.eval else []
        self.stream = DataStream(len(self.examples), c.seed)
        self.step = 0
        self.kept: tuple[np.ndarray, ResponseLogprobs] | None = None  # π_old's forward pass, when it is the update's
        if resume and (progress := load_latest(c.output_dir, self.accelerator)):
            self.step = progress.step
            self.stream = DataStream(len(self.examples), c.seed, **progress.data)
            log.info("resumed from step %d", self.step)
        self.main = self.accelerator.is_main_process
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        batch = a.prompts_per_step * a.samples_per_prompt
        if batch % (a.updates_per_batch * self.world):
            raise ConfigError(f"algorithm.prompts_per_step: {a.prompts_per_step} x samples_per_prompt "
                              f"{a.samples_per_prompt} = {batch} samples must split evenly into updates_per_batch "
                              f"{a.updates_per_batch} x {self.world} processes")
        r = c.rollout
        self.sync = EngineSync(r, self.accelerator.unwrap_model(self.model), self.rank,
                               c.env_secret(r.admin_key_env)) if r.weight_sync != "http" else None
        self.runlog = RunLog(c.output_dir, enabled=self.main)
        self.teacher_swap = TeacherSwapper(c, enabled=self.main)  # config edits / SIGHUP swap teachers between steps
        if resume:
            self.runlog.truncate_after(self.step)

    # ---- set-up ------------------------------------------------------------------------------------------------

    async def connect(self) -> None:
        """Handshake with the rollout server and every teacher; refuse a tokenizer that differs from the student's."""
        if not self.main:
            if self.sync is not None:
                self.sync.connect()  # only the main process forms the group; this one builds its engine
            await self.push_weights()  # every process takes part in gathering the weights
            return
        c = self.config
        student_fp = tokenizer_fingerprint(self.tokenizer)
        r = c.rollout
        self.rollout = RolloutSession(RolloutClient(r.url, api_key=c.env_secret(r.api_key_env),
                                                    admin_key=c.env_secret(r.admin_key_env), timeout=r.timeout_s),
                                      r.url, r.retries, r.backoff_s, retry_budget_s=r.retry_budget_s)
        info = await self.rollout.info()
        if info.tokenizer_fingerprint != student_fp:
            raise TokenizerMismatch(f"rollout server {c.rollout.url} serves tokenizer {info.tokenizer_fingerprint[:16]}"
                                    f", the student's is {student_fp[:16]}: it does not serve this student")
        pools = {d: [Endpoint(u, c.env_secret(p.api_key_env)) for u in p.urls] for d, p in c.teachers.items()}
        t = c.teacher_client
        cache = ScoreCache(c.cache.url, c.cache.ttl_s, c.cache.namespace, password=c.env_secret(c.cache.password_env))
        log.info("score cache: namespace %r (shared with every run that names it)", cache.namespace)
        self.router = TeacherRouter(pools, cache, timeout_s=t.timeout_s,
                                    retries=t.retries, backoff_s=t.backoff_s, retry_budget_s=t.retry_budget_s,
                                    max_items_per_request=t.max_items_per_request,
                                    breaker_failures=t.breaker_failures, breaker_cooldown_s=t.breaker_cooldown_s,
                                    float_dtype=t.float_dtype)
        await self.router.handshake(student_fp, c.allow_tokenizer_mismatch,
                                    expected={d: p.fingerprint for d, p in c.teachers.items()})
        for domain, pool in c.teachers.items():
            if (why := c.signal_shortfall(domain, pool, self.router.info(domain))) is not None:
                raise ConfigError(f"the {domain!r} teacher: {why}")
        self.teacher_swap.attach(self.router, student_fp, self.step)
        if self.sync is not None:
            await asyncio.to_thread(self.sync.connect)
        await self.push_weights()  # the sampler serves exactly the trainer's weights, also after a resume

    async def close(self) -> None:
        self.teacher_swap.close()
        if self.sync is not None:
            self.sync.close()
        for name in ("router", "rollout"):
            if hasattr(self, name):
                await getattr(self, name).aclose()
        self.runlog.close()

    # ---- the step ----------------------------------------------------------------------------------------------

    async def sample(self, examples: list[Example], n: int) -> list[Rollout]:
        r = self.config.rollout
        out = await self.rollout.generate(generate_request(
            [ex.prompt_ids for ex in examples], [ex.images for ex in examples], n=n, temperature=r.temperature,
            top_p=r.top_p, max_tokens=r.max_tokens, seed=derive_seed(self.config.seed, self.step, "train")))
        return [Rollout(ex, i, s.token_ids, s.logprobs, s.finish_reason)
                for i, (ex, group) in enumerate(zip(examples, out.samples, strict=True)) for s in group]

    def verify(self, rollouts: list[Rollout]) -> int:
        verdicts = verify_responses(self.tokenizer, self.config.verifier_for, [r.response for r in rollouts],
                                    [r.example.record for r in rollouts])
        for r, v in zip(rollouts, verdicts, strict=True):
            r.correct = v.correct
        return sum(v.error is not None for v in verdicts)

    async def score(self, rollouts: list[Rollout]) -> None:
        """Teacher log-probs of each response. A sequence its teacher would refuse (too long, a token it does not
        have) stays unscored, so it is masked alone instead of failing its whole request."""
        signals = {d: self.config.signal_of(pool) for d, pool in self.config.teachers.items()}
        items = [ScoreItem.of_arrays(r.example.prompt_array, r.response,
                                     distribution=signals[r.example.domain] == "full",
                                     candidates=r.candidates if signals[r.example.domain] == "topk" else None)
                 for r in rollouts]
        fits = [(r, item) for r, item in zip(rollouts, items, strict=True)
                if score_item_problem(item, self.router.info(r.example.domain)) is None]
        requests = [(r.example.domain, item) for r, item in fits]
        images = [r.example.images for r, _ in fits]
        for (r, _), span in zip(fits, await self.router.score_spans(requests, images), strict=True):
            if span is not None:
                r.teacher, r.teacher_dist = span.logprobs, span.distribution
                r.teacher_candidates, r.teacher_tail = span.candidate_logprobs, span.tail_logprobs

    def prefill(self, chunk: list[Rollout]) -> ResponseLogprobs:
        return response_prefill(self.model, [r.example.prompt_ids for r in chunk], [r.response for r in chunk],
                                 [r.example.images for r in chunk], self.vision)

    def old_logprobs(self, rollouts: list[Rollout], rows: np.ndarray, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """π_old of the given rows in train precision, as a (len(rollouts), T) tensor that is zero elsewhere; and,
        when k > 0, π_old's k most likely ids at each position as (len(rollouts), T, k) (zero elsewhere).

        When the update will be one micro-batch of exactly these rows (`one_pass`), this forward pass is the
        update's own: it runs with grad and is kept, and π_old is its detached value (on-policy, π_old = π_θ)."""
        keep = self.one_pass(rows)
        self.model.train(keep)
        width = max(len(r.response) for r in rollouts)
        out = torch.zeros((len(rollouts), width))
        top = torch.zeros((len(rollouts), width, k), dtype=torch.int64)
        mb = self.config.algorithm.micro_batch_size
        for i in range(0, len(rows), mb):
            idx = rows[i:i + mb]
            with torch.set_grad_enabled(keep):
                scored = self.prefill([rollouts[j] for j in idx])
            if keep:
                self.kept = (idx, scored)
            with torch.no_grad():
                for row, (j, lp) in enumerate(zip(idx, scored.logprobs.detach().cpu(), strict=True)):
                    out[j, : lp.shape[0]] = lp
                    if k:
                        ids = scored.top_k(row, k)[0].cpu()
                        top[j, : len(ids)] = ids
        return out, top

    def one_pass(self, rows: np.ndarray) -> bool:
        """Whether the update is a single micro-batch of `rows` on the weights π_old is computed with (one update
        per batch, the process's share within micro_batch_size): then π_old's forward pass serves the update too."""
        a = self.config.algorithm
        return a.updates_per_batch == 1 and len(rows) <= a.micro_batch_size

    def minibatches(self, size: int) -> list[np.ndarray]:
        order = self.rng("minibatch").permutation(size)
        return np.array_split(order, self.config.algorithm.updates_per_batch)

    def share(self, minibatch: np.ndarray) -> np.ndarray:
        """This process's rows of a minibatch (all of them with one process)."""
        return minibatch[self.rank::self.world]

    def broadcast(self, obj):
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj if self.main else None])[0]

    async def train_step(self) -> dict[str, float]:
        """rollouts → Batch → advantages → Uni-OPD → update → weights to the sampler; metrics (main process)."""
        a, times = self.config.algorithm, {}
        with timed("step", times):
            examples = [self.examples[i] for i in self.stream.take(a.prompts_per_step)]
            with timed("generate", times):
                rollouts = self.broadcast(await self.sample(examples, a.samples_per_prompt) if self.main else None)
            batch, verify_errors = await self.judge(rollouts, times)
            advantages, mask = self.estimator.advantages(batch)
            recipe = uni_opd(advantages, mask, batch.group, batch.correct, self.recipe, self.rng("balance"))
            self.log_returns(batch, advantages, mask, recipe)
            with timed("train", times):
                train_stats = self.update(rollouts, batch, advantages, recipe)
            with timed("sync", times):
                version = await self.push_weights()
        self.step += 1
        if not self.main:
            return {}
        return {**self.step_metrics(batch, recipe.advantages, mask, train_stats, times, verify_errors, version),
                **recipe.metrics}

    async def judge(self, rollouts: list[Rollout], times: dict[str, float]) -> tuple[Batch, int]:
        """Verdicts ‖ teacher scores ‖ π_old, overlapped, collated; the main process's verdicts and scores reach every
        process, and each π_old row comes from the process that computes it. Returns the Batch and verifier errors."""
        mine = np.concatenate([self.share(m) for m in self.minibatches(len(rollouts))])
        k = self.config.algorithm.topk if self.estimator.teacher_signal == "topk" else 0
        self.kept = None
        # verification needs only the rollouts: it starts at once and runs beside π_old and the scoring
        verify_work = asyncio.ensure_future(timed_await("verify", times, asyncio.to_thread(self.verify, rollouts))
                                            ) if self.main else None
        old_work = timed_await("old_logprobs", times, asyncio.to_thread(self.old_logprobs, rollouts, mine, k))
        if k:  # the teacher scores π_old's top-k, so π_old comes first, from every process, before the scoring
            computed = await old_work
            old, top = (self.accelerator.reduce(t.to(self.accelerator.device), "sum").cpu() for t in computed)
            for r, ids in zip(rollouts, top.numpy(), strict=True):
                r.candidates = ids[: len(r.response)]
            if self.main:
                await timed_await("score", times, self.score(rollouts))
        elif self.main:
            score_work = timed_await("score", times, self.score(rollouts) if self.estimator.teacher_signal
                                     else asyncio.sleep(0))
            _, (old, _) = await asyncio.gather(score_work, old_work)
        else:
            old, _ = await old_work
        verify_errors = await verify_work if verify_work is not None else 0
        outcomes = self.broadcast([(r.correct, r.teacher, r.teacher_dist, r.teacher_candidates, r.teacher_tail)
                                   for r in rollouts])
        for r, outcome in zip(rollouts, outcomes, strict=True):
            r.correct, r.teacher, r.teacher_dist, r.teacher_candidates, r.teacher_tail = outcome
        if not k:
            old = self.accelerator.reduce(old.to(self.accelerator.device), "sum").cpu()
        if "score" in times:
            times["teacher_wait"] = teacher_wait(times, old_first=bool(k))
        return collate(rollouts, old), verify_errors

    def rng(self, purpose: str) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self.config.seed, self.step, purpose))

    def log_returns(self, batch: Batch, advantages: torch.Tensor, mask: torch.Tensor, recipe: RecipeOutput) -> None:
        """G per rollout before and after calibration, for the experiment's distribution plots (when asked for)."""
        if self.config.schedule.log_returns and self.main:
            self.runlog.write(self.step + 1, {
                "domain": batch.domains, "correct": (batch.correct == 1).tolist(),
                "G": trajectory_returns(advantages, mask).tolist(),
                "G_calibrated": trajectory_returns(recipe.advantages, mask).tolist(),
                "in_loss": (recipe.loss_mask.sum(-1) > 0).tolist()}, kind="returns")

    def update(self, rollouts: list[Rollout], batch: Batch, advantages: torch.Tensor,
               recipe: RecipeOutput) -> dict[str, float]:
        a = self.config.algorithm
        inputs = LossRows(batch.old, batch.teacher, batch.teacher_dist, recipe.advantages,
                          recipe.advantages - advantages, recipe.loss_mask, batch.candidates,
                          batch.teacher_candidates, batch.teacher_tail, batch.rich)
        self.model.train()
        stats: dict[str, list[float]] = defaultdict(list)
        for minibatch in self.minibatches(len(rollouts)):
            own = self.share(minibatch)
            total = 0.0
            for i in range(0, len(own), a.micro_batch_size):
                idx = own[i:i + a.micro_batch_size]
                kept, self.kept = self.kept, None
                student = kept[1] if kept is not None and np.array_equal(kept[0], idx) else self.prefill(
                    [rollouts[j] for j in idx])
                rows = inputs.take(idx, student.logprobs, num_samples=len(own))  # DDP's mean: the minibatch loss
                loss, s = self.estimator.loss(student, rows, self.loss_spec)
                self.accelerator.backward(loss)
                total += float(loss.detach())
                for name, value in asdict(s).items():
                    if not math.isnan(value):
                        stats[name].append(value)
            stats["loss"].append(float(self.accelerator.reduce(torch.tensor(total, device=self.accelerator.device),
                                                               "mean")))
            if a.max_grad_norm:
                stats["grad_norm"].append(float(self.accelerator.clip_grad_norm_(self.model.parameters(),
                                                                                 a.max_grad_norm)))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["lr"] = self.scheduler.get_last_lr()[0]
        return out

    async def push_weights(self) -> int:
        """All processes gather the weights (needed with sharded models); the main process uploads them, or sends
        them through vLLM's weight-transfer engine (rollout.weight_sync)."""
        if self.sync is not None:
            loaded = await asyncio.to_thread(self.sync.push)
            if not self.main:
                return -1
            resend = (lambda: asyncio.to_thread(self.sync.reconnect_and_push)) if self.world == 1 else None
            self.rollout.transferred(loaded, resend)
            return loaded.weight_version
        if self.main:
            self.rollout.payload = None  # the last push's copy goes before the next one is built
        model = self.accelerator.unwrap_model(self.model)
        payload = await asyncio.to_thread(gathered_safetensors, model, self.main)
        if not self.main:
            return -1
        return (await self.rollout.push_weights(payload)).weight_version

    def step_metrics(self, batch: Batch, advantages: torch.Tensor, mask: torch.Tensor, train_stats: dict,
                     times: dict[str, float], verify_errors: int, version: int) -> dict[str, float]:
        m = batch_metrics(batch, advantages, mask, uses_teacher=self.estimator.teacher_signal is not None)
        m.update({f"train/{k}": v for k, v in train_stats.items()})
        m.update({f"time/{k}": v for k, v in times.items()})
        m.update(tokens_per_s=m["tokens"] / max(times["step"], 1e-9), weight_version=version,
                 verify_errors=verify_errors)
        m.update(self.router.metrics(reset=True))
        m.update(self.rollout.metrics())
        m.update(self.teacher_swap.metrics())
        return m

    # ---- evaluation, checkpoints, the run ----------------------------------------------------------------------

    async def evaluate(self) -> dict[str, float]:
        c = self.config
        return await heldout_accuracy(self.rollout, self.tokenizer, c.verifier_for,
                                      [ex.prompt_ids for ex in self.eval_examples],
                                      [ex.record for ex in self.eval_examples], c.schedule.eval_samples,
                                      derive_seed(c.seed, self.step, "eval"), c.rollout.max_tokens)

    def checkpoint(self) -> None:
        progress = Progress(step=self.step, data=self.stream.state())
        save_checkpoint(self.config.output_dir, progress, self.accelerator, self.model, self.tokenizer,
                        self.config.schedule.keep_checkpoints, self.vision.processor if self.vision else None)

    async def run(self) -> None:
        s = self.config.schedule
        try:
            self.teacher_swap.install_sighup()
            await self.connect()
            if self.main and self.eval_examples and s.eval_every and self.step == 0:
                self.runlog.write(0, await self.evaluate(), kind="eval")  # the student before training
            bar = tqdm(total=s.steps, initial=self.step, disable=not self.main, desc="uniopd train")
            while self.step < s.steps:
                await self.teacher_swap.at_step_boundary(self.step)  # main process only; no-op elsewhere
                metrics = await self.train_step()
                self.runlog.write(self.step, metrics)
                bar.update(1)
                bar.set_postfix(kl=f"{metrics.get('reverse_kl', float('nan')):.3f}",
                                loss=f"{metrics.get('train/loss', float('nan')):.3f}")
                last = self.step == s.steps
                if s.checkpoint_every and (self.step % s.checkpoint_every == 0 or last):
                    self.checkpoint()
                if self.main and self.eval_examples and ((s.eval_every and self.step % s.eval_every == 0) or last):
                    self.runlog.write(self.step, await self.evaluate(), kind="eval")
            bar.close()
        finally:
            await self.close()
