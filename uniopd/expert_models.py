"""Trained tiny experts: math, code and strong teachers and a weak student, SFT'd from scratch on the synthetic domains.

Every model shares one tokenizer (uniopd.tiny_models.build_tokenizer), so any teacher can score any student. The
recipes are deterministic (seeded data, seeded init, single-threaded-reproducible ops) and cached: a model directory
holds `recipe.json`, and a directory whose recipe matches is reused, anything else is rebuilt.

Why these shapes: the teachers see one solution style per domain (so a student's other style is under-scored, the
first failure mode of docs/method.md §4); the strong teacher is larger and sees both domains; the student is small and
sees a small, mixed-style sample for few steps, so it starts with room to improve and with mixed-correctness groups.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from uniopd.synthetic import code_tasks, math_tasks, visual_tasks

log = logging.getLogger("uniopd.models")
RECIPE_VERSION = 2  # 2: the shared tokenizer gained the image tokens
SEQ_MULTIPLE = 8
BUCKET_BATCHES = 8


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden: int
    layers: int
    math_styles: tuple[str, ...]
    code_styles: tuple[str, ...]
    steps: int
    sample_size: int | None = None  # None: fresh tasks every step; else a fixed sample of this many examples
    lr: float = 3e-3
    batch: int = 16
    seed: int = 0
    visual_styles: tuple[str, ...] = ()
    vision: bool = False  # a tiny Idefics3 (uniopd.tiny_models.build_tiny_vlm) instead of a text model

    def scaled(self, factor: float) -> ModelSpec:
        return ModelSpec(**{**asdict(self), "steps": max(10, int(self.steps * factor))})


SPECS: dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("math-teacher", 128, 4, ("steps",), (), steps=1200, seed=1),
    ModelSpec("code-teacher", 128, 4, (), ("def",), steps=1200, seed=2),
    ModelSpec("strong-teacher", 192, 4, ("steps",), ("def",), steps=1600, seed=3),
    ModelSpec("student", 128, 4, math_tasks.STYLES, code_tasks.STYLES, steps=2000, sample_size=4000, seed=4),
    # cross-modal (docs/method.md §1): a multimodal teacher for the image prompts, and a multimodal student that also
    # writes code, so the text code teacher and the image teacher distil into one model
    ModelSpec("visual-teacher", 128, 4, (), (), steps=1500, seed=5, visual_styles=("count",), vision=True),
    ModelSpec("mm-student", 128, 4, (), code_tasks.STYLES, steps=2000, sample_size=4000, seed=6,
              visual_styles=visual_tasks.STYLES, vision=True),
)}
QUICK_FACTOR = 0.05  # --quick: same recipes, 5% of the steps (CI smoke runs; the models are undertrained)


Pair = tuple[str, str, tuple]  # prompt, response, the prompt's images (PIL)


def sft_examples(spec: ModelSpec, rng: random.Random) -> Iterator[Pair]:
    """(prompt, response, images): domains alternate, the style is uniform over the spec's styles."""
    domains = [d for d, styles in (("math", spec.math_styles), ("code", spec.code_styles),
                                   ("visual", spec.visual_styles)) if styles]
    modules = {"math": (math_tasks, spec.math_styles), "code": (code_tasks, spec.code_styles),
               "visual": (visual_tasks, spec.visual_styles)}
    while True:
        module, styles = modules[rng.choice(domains)]
        task = module.sample_task(rng, rng.randint(1, module.MAX_LEVEL))
        images = (task.render(),) if module is visual_tasks else ()
        yield task.prompt(), task.solution(rng.choice(styles)), images


def _encode(tokenizer, pairs: list[Pair], vision=None):
    """Chat-rendered prompt + response + <|im_end|>; the loss covers only the response (labels -100 elsewhere).
    A multimodal model's prompts get their image placeholders expanded; the image tensors come back too."""
    import torch

    from trainer.data import render_prompt

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompts = [render_prompt(tokenizer, {"prompt": prompt}) for prompt, _, _ in pairs]
    pixels: dict = {}
    if vision is not None:
        prompts, pixels = vision.expand(prompts, [images for _, _, images in pairs])
    rows = []
    for p, (_, response, _) in zip(prompts, pairs, strict=True):
        r = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
        rows.append((p + r, [-100] * len(p) + r))
    width = -(-max(len(ids) for ids, _ in rows) // SEQ_MULTIPLE) * SEQ_MULTIPLE
    pad = tokenizer.pad_token_id
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    return ids, labels, attention, pixels


def _length_buckets(tokenizer, pairs: list[Pair], batch: int, rng: random.Random) -> list[list[Pair]]:
    """Batches of similar length in random order: padding, not the model, was most of the compute."""
    pairs = sorted(pairs, key=lambda p: len(p[0]) + len(p[1]))
    batches = [pairs[i:i + batch] for i in range(0, len(pairs), batch)]
    rng.shuffle(batches)
    return batches


def train_model(spec: ModelSpec, out: Path) -> Path:
    """SFT from a seeded random init; AdamW, linear warm-up then cosine decay to 10%."""
    import torch

    from modeling.loading import from_pretrained
    from modeling.multimodal import Vision
    from uniopd.tiny_models import build_tiny_model, build_tiny_vlm

    if spec.vision:
        build_tiny_vlm(out, spec.seed, spec.hidden, spec.layers, init_range=0.02)
    else:
        build_tiny_model(out, "qwen3", spec.seed, spec.hidden, spec.layers, init_range=0.02)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = from_pretrained(out)
    vision = Vision(out) if spec.vision else None
    torch.manual_seed(spec.seed)
    rng = random.Random(f"sft-{spec.name}-{spec.seed}")
    stream = sft_examples(spec, rng)
    fixed = [next(stream) for _ in range(spec.sample_size)] if spec.sample_size else None
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, spec.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warmup, 0.1 + 0.45 * (
        1 + math.cos(math.pi * min(1.0, i / spec.steps)))))
    model.train()
    start = time.perf_counter()
    batches: list[list[Pair]] = []
    for step in range(spec.steps):
        if not batches:
            batches = _length_buckets(tokenizer, fixed, spec.batch, rng) if fixed else _length_buckets(
                tokenizer, [next(stream) for _ in range(spec.batch * BUCKET_BATCHES)], spec.batch, rng)
        ids, labels, attention, pixels = _encode(tokenizer, batches.pop(), vision)
        loss = model(input_ids=ids, attention_mask=attention, labels=labels, **pixels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == spec.steps - 1:
            log.info("%s step %d/%d loss %.4f (%.0fs)", spec.name, step + 1, spec.steps, loss.item(),
                     time.perf_counter() - start)
    model.save_pretrained(out, safe_serialization=True)
    return out


def recipe_of(spec: ModelSpec) -> dict:
    """As JSON reads it back (tuples become lists), so a stored recipe compares equal to the spec's."""
    return json.loads(json.dumps({"version": RECIPE_VERSION, **asdict(spec)}))


def model_dir(spec: ModelSpec, root: Path) -> Path:
    return root / "models" / spec.name


def is_current(spec: ModelSpec, root: Path) -> bool:
    recipe = model_dir(spec, root) / "recipe.json"
    return recipe.is_file() and json.loads(recipe.read_text()) == recipe_of(spec)


def ensure_models(specs: list[ModelSpec], root: Path) -> dict[str, Path]:
    """Train the models that are missing or stale, all at once in processes of one thread each: these models are
    too small for a second thread to help (measured: 2 threads took longer per step than 1), so the cores are
    better spent on different models."""
    import multiprocessing

    todo = [s for s in specs if not is_current(s, root)]
    workers = len(todo)
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_single_threaded) as pool:
            pool.starmap(ensure_model, [(s, root) for s in todo])
    else:
        for spec in todo:
            ensure_model(spec, root)
    return {s.name: model_dir(s, root) for s in specs}


def _single_threaded() -> None:
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def ensure_model(spec: ModelSpec, root: Path) -> Path:
    """The model for `spec` under root/models/<name>, trained unless a matching recipe.json is already there."""
    out = model_dir(spec, root)
    if is_current(spec, root):
        return out
    tmp = out.with_name(out.name + ".partial")
    train_model(spec, tmp)
    (tmp / "recipe.json").write_text(json.dumps(recipe_of(spec), indent=1))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
