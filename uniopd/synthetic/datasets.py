"""Train and held-out prompt files for the synthetic domains, in the trainer's jsonl record format.

Held-out prompts are disjoint from the training prompts (by prompt text, and for the visual domain by prompt text
and image together), so evaluation never measures recall.

Images: a visual record names its picture by a content hash; `write_datasets` writes the PNG to out/images/ and the
record's "images" entry is that path relative to the jsonl file's directory ("images/<hash>.png").

Only DEFAULT_DOMAINS (math, code) are written unless asked: the experiment and `models prepare` train text models,
and the visual domain is for the tiny vision-language model only.
"""

from __future__ import annotations

import json
from pathlib import Path

from uniopd.synthetic import code_tasks, math_tasks, visual_tasks

GENERATORS = {"math": math_tasks.sample_tasks, "code": code_tasks.sample_tasks, "visual": visual_tasks.sample_tasks}
VERIFIER_OF = {"visual": "math"}  # the visual domain's answers end in "The answer is N.", like math's
DEFAULT_DOMAINS = ("math", "code")
IMAGE_DIR = "images"


def domain_tasks(domain: str, seed: int, n_train: int, n_eval: int) -> tuple[list, list]:
    """n_train training tasks and n_eval held-out ones whose prompt (with its images) never occurs in training."""
    tasks = GENERATORS[domain](seed, n_train + 20 * n_eval)
    train = tasks[:n_train]
    seen = {identity(t.record()) for t in train}
    held_out: list = []
    for task in tasks[n_train:]:
        if len(held_out) == n_eval:
            break
        key = identity(task.record())
        if key not in seen:
            held_out.append(task)
            seen.add(key)
    if len(held_out) < n_eval:
        raise ValueError(f"{domain}: only {len(held_out)} distinct held-out prompts, wanted {n_eval}")
    return train, held_out


def domain_records(domain: str, seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """n_train training records and n_eval held-out ones, as written to the jsonl files."""
    train, held_out = domain_tasks(domain, seed, n_train, n_eval)
    return [_written(t) for t in train], [_written(t) for t in held_out]


def identity(record: dict) -> tuple:
    """What makes two prompts the same: the text, and the pictures for visual ones."""
    return record["prompt"], tuple(record.get("images", ()))


def _written(task) -> dict:
    record = task.record()
    if "images" in record:
        record["images"] = [f"{IMAGE_DIR}/{name}" for name in record["images"]]
    return record


def write_images(out: Path, tasks: list) -> None:
    """out/images/<hash>.png for each task's picture; content-named, so a file already there is already right."""
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for task in tasks:
        path = out / IMAGE_DIR / task.image_name()
        if not path.exists():
            tmp = path.with_suffix(".partial")
            tmp.write_bytes(task.png())
            tmp.rename(path)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(path)
    return path


def write_datasets(out: Path, seed: int = 0, n_train: int = 512, n_eval: int = 48,
                   domains: tuple[str, ...] = DEFAULT_DOMAINS) -> dict[str, Path]:
    """out/{domain}_{train,eval}.jsonl for each domain (and out/images/ for the visual one); the paths by name."""
    paths = {}
    for domain in domains:
        train, held_out = domain_tasks(domain, seed, n_train, n_eval)
        if any(hasattr(t, "png") for t in train + held_out):
            write_images(out, train + held_out)  # before the jsonl, so a record never names a missing image
        paths[f"{domain}_train"] = write_jsonl(out / f"{domain}_train.jsonl", [_written(t) for t in train])
        paths[f"{domain}_eval"] = write_jsonl(out / f"{domain}_eval.jsonl", [_written(t) for t in held_out])
    return paths
