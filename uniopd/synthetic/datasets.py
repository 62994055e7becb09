"""Train and held-out prompt files for the synthetic domains, in the trainer's jsonl record format.

Held-out prompts are disjoint from the training prompts (by prompt text), so evaluation never measures recall.
"""

from __future__ import annotations

import json
from pathlib import Path

from uniopd.synthetic import code_tasks, math_tasks

GENERATORS = {"math": math_tasks.sample_tasks, "code": code_tasks.sample_tasks}


def domain_records(domain: str, seed: int, n_train: int, n_eval: int) -> tuple[list[dict], list[dict]]:
    """n_train training records and n_eval held-out ones whose prompts never occur in training."""
    tasks = GENERATORS[domain](seed, n_train + 20 * n_eval)
    train = [t.record() for t in tasks[:n_train]]
    seen = {r["prompt"] for r in train}
    held_out: list[dict] = []
    for task in tasks[n_train:]:
        rec = task.record()
        if rec["prompt"] not in seen and len(held_out) < n_eval:
            held_out.append(rec)
            seen.add(rec["prompt"])
    if len(held_out) < n_eval:
        raise ValueError(f"{domain}: only {len(held_out)} distinct held-out prompts, wanted {n_eval}")
    return train, held_out


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(path)
    return path


def write_datasets(out: Path, seed: int = 0, n_train: int = 512, n_eval: int = 48) -> dict[str, Path]:
    """out/{domain}_{train,eval}.jsonl for every domain; returns the paths by name."""
    paths = {}
    for domain in GENERATORS:
        train, held_out = domain_records(domain, seed, n_train, n_eval)
        paths[f"{domain}_train"] = write_jsonl(out / f"{domain}_train.jsonl", train)
        paths[f"{domain}_eval"] = write_jsonl(out / f"{domain}_eval.jsonl", held_out)
    return paths
