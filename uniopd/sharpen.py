"""Domain teachers made from the student: rejection-sampling fine-tuning (RFT, expert iteration) on one domain.

Why: in the paper every domain teacher is the student's own base model sharpened by RL on that domain, so teacher and
student share everything but the domain skill the RL added, and OPD only has to transfer that. RFT is the cheapest
RL-like sharpening that runs in-process: sample k responses per training prompt from the current model (the
held-out evaluation's sampler, at the recipe's temperature), keep the ones the project's verifier accepts, SFT on
them, repeat. Each round moves probability mass onto the model's own correct solutions, which is what raises accuracy
at temperature 1 — no new knowledge, only sharpening. Sampling below temperature 1 keeps the model's likelier correct
solutions, and weighting the prompts toward the hard levels gives those levels enough kept samples: measured on math
(docs/experiment-notes.md), both together lifted the teacher from ~2.1x to ~2.6x the student.

The prompts are fresh every round (the domain's generator, the experiment's held-out prompts left out): measured,
RFT on the experiment's fixed 384 training prompts raised the pass rate on them while held-out accuracy stayed flat —
it memorised their answers.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

from uniopd.sft import Pair, length_buckets, sft_step
from uniopd.synthetic import code_tasks, math_tasks, visual_tasks
from uniopd.synthetic.datasets import VERIFIER_OF, domain_records, identity

log = logging.getLogger("uniopd.sharpen")
MAX_TOKENS = 64  # the experiment's response limit (uniopd.experiment_plan.Plan.max_tokens)
TASKS = {"math": math_tasks, "code": code_tasks, "visual": visual_tasks}
GENERATE_CHUNK = 64  # prompts per generate call: one long row holds a whole batch back, and big batches cost more


@dataclass(frozen=True)
class RFTRecipe:
    domain: str
    rounds: int
    prompts: int  # fresh prompts per round
    samples: int  # k responses per prompt and round
    temperature: float = 1.0  # of the rounds' sampling; below 1 the kept samples are the model's likelier solutions
    level_weights: tuple[float, ...] | None = None  # relative share of each level among the prompts; None: uniform
    epochs: int = 2  # SFT passes over a round's kept samples
    lr: float = 3e-4  # measured: 1e-3 gained in the first round and lost in the next ones
    batch: int = 16
    seed: int = 0
    held_out: tuple[int, int, int] = (0, 384, 48)  # never sharpen on these held-out prompts: (seed, n_train, n_eval)


@dataclass(frozen=True)
class Sampled:
    record: dict
    images: tuple  # the prompt's pictures (PIL), for the SFT pair
    text: str  # decoded, special tokens dropped (what the verifier reads)
    finished: bool  # ended with a stop token, not at the length limit
    correct: bool


def fresh_tasks(recipe: RFTRecipe, rng: random.Random) -> list:
    """recipe.prompts distinct tasks of the domain (by prompt, and picture for visual ones), none of them a held-out
    prompt, levels drawn by recipe.level_weights."""
    module = TASKS[recipe.domain]
    levels = range(1, module.MAX_LEVEL + 1)
    if recipe.level_weights is not None and len(recipe.level_weights) != len(levels):
        raise ValueError(f"level_weights: {recipe.domain} has {len(levels)} levels, got {len(recipe.level_weights)}")
    excluded = {identity(r) for r in domain_records(recipe.domain, *recipe.held_out)[1]}
    tasks: dict[tuple, object] = {}
    for _ in range(1000 * recipe.prompts):
        level = rng.choices(levels, recipe.level_weights)[0] if recipe.level_weights else rng.randint(1, levels[-1])
        task = module.sample_task(rng, level)
        key = identity(_named(task.record()))
        if key not in excluded:
            tasks.setdefault(key, task)
        if len(tasks) == recipe.prompts:
            return list(tasks.values())
    raise ValueError(f"{recipe.domain}: fewer than {recipe.prompts} distinct training prompts")


def _named(record: dict) -> dict:
    """A record as the held-out files name its pictures (datasets.domain_records)."""
    from uniopd.synthetic.datasets import IMAGE_DIR

    return {**record, "images": [f"{IMAGE_DIR}/{n}" for n in record["images"]]} if "images" in record else record


def sample_and_verify(generator, tokenizer, tasks: list, k: int, seed: int, temperature: float = 1.0) -> list[Sampled]:
    """k samples per prompt, top-p 1, no top-k (the held-out protocol, docs/method.md §6, at temperature 1)."""
    from services.rollout_server.generator import SamplingOptions
    from trainer.data import render_prompt
    from trainer.evaluation import verify_responses

    options = SamplingOptions(n=k, temperature=temperature, top_p=1.0, top_k=0, max_tokens=MAX_TOKENS, seed=seed)
    records = [t.record() for t in tasks]
    images = [(t.render(),) if "images" in r else () for t, r in zip(tasks, records, strict=True)]
    prompts = [render_prompt(tokenizer, r) for r in records]
    groups = [g for i in range(0, len(prompts), GENERATE_CHUNK)
              for g in generator.generate(prompts[i:i + GENERATE_CHUNK], replace(options, seed=seed + i),
                                          images[i:i + GENERATE_CHUNK] if generator.vision else None)]
    flat = [(r, im, s) for r, im, group in zip(records, images, groups, strict=True) for s in group]
    verdicts = verify_responses(tokenizer, lambda d: VERIFIER_OF.get(d, d), [s.token_ids for _, _, s in flat],
                                [r for r, _, _ in flat])
    return [Sampled(r, im, tokenizer.decode(s.token_ids.tolist(), skip_special_tokens=True),
                    s.finish_reason == "stop", v.correct) for (r, im, s), v in zip(flat, verdicts, strict=True)]


def keep_correct(samples: list[Sampled]) -> list[Pair]:
    """The SFT pairs of a round: verified-correct responses that ended on their own (a truncated response is not a
    complete solution, even when its answer checks out)."""
    return [(s.record["prompt"], s.text, s.images) for s in samples if s.correct and s.finished]


def sharpen(model_dir: Path, recipe: RFTRecipe) -> list[dict]:
    """Sharpen the model in model_dir in place, round by round; the per-round log (pass rate on the round's prompts,
    pairs kept, SFT steps, seconds) is returned and written to model_dir/sharpen.json. Each round's SFT starts a
    fresh optimizer: a round is one SFT on that round's own samples."""
    import torch

    from services.rollout_server.backends.hf import HFGenerator

    generator = HFGenerator(model_dir, device="cpu")
    model, tokenizer = generator.model, _tokenizer(model_dir)
    rng = random.Random(f"rft-{recipe.domain}-{recipe.seed}")
    torch.manual_seed(recipe.seed)
    history: list[dict] = []
    for round_ in range(recipe.rounds):
        start = time.perf_counter()
        model.eval()
        samples = sample_and_verify(generator, tokenizer, fresh_tasks(recipe, rng), recipe.samples,
                                    rng.getrandbits(63), recipe.temperature)
        pairs = keep_correct(samples)
        sampled_s = time.perf_counter() - start
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
        batches = [b for _ in range(recipe.epochs) for b in length_buckets(pairs, recipe.batch, rng)]
        for batch in batches:
            sft_step(model, tokenizer, batch, opt, generator.vision)
        history.append({"round": round_ + 1, "samples": len(samples),
                        "pass_rate": round(sum(s.correct for s in samples) / len(samples), 4), "kept": len(pairs),
                        "sft_steps": len(batches), "sample_s": round(sampled_s, 1),
                        "s": round(time.perf_counter() - start, 1)})
        log.info("rft %s round %d/%d: %s", recipe.domain, round_ + 1, recipe.rounds, history[-1])
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    (model_dir / "sharpen.json").write_text(json.dumps(history, indent=1))
    return history


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)
