"""Offline difficulty-aware data balancing (docs/method.md §2) as a resumable job.

Every prompt's pass count c(q) ∈ {0..N} is estimated by sampling N responses from the student (through the rollout
server, temperature 1.0, top-p 0.95, top-k 50) and verifying them. Each scored prompt is appended to a progress file
at once, so a restarted job samples only what is left. Then the informative bins are upsampled toward a flat
histogram (trainer.balancing) and the new dataset, the before/after histograms (JSON) and their plot (PNG) written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from proto.client import RolloutClient, generate_request
from trainer.balancing import histogram_shape, pass_count_histogram, upsample, upsample_factors
from trainer.config import RunConfig
from trainer.data import derive_seed, load_records, record_images, render_prompt
from trainer.evaluation import verify_responses


def record_key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def read_progress(path: Path, records: list[dict], samples: int) -> dict[int, int]:
    """Pass counts already measured, by record index. Rows for another record or another N are ignored (the input
    changed), and so is a torn last line (a crash mid-write)."""
    done: dict[int, int] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                i = int(row["index"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if 0 <= i < len(records) and row.get("samples") == samples and row.get("key") == record_key(records[i]):
                done[i] = int(row["passes"])
    return done


async def estimate_pass_counts(config: RunConfig, records: list[dict], samples: int, progress: Path,
                               chunk: int = 16) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.student.model)
    done = read_progress(progress, records, samples)
    if progress.exists() and not progress.read_bytes().endswith(b"\n"):
        with progress.open("a") as f:
            f.write("\n")  # end a line torn by a crash, so the next row starts on its own line
    todo = [i for i in range(len(records)) if i not in done]
    r = config.rollout
    async with RolloutClient(r.url, api_key=config.env_secret(r.api_key_env)) as client:
        with tqdm(total=len(records), initial=len(done), desc="pass counts") as bar, progress.open("a") as log:
            for start in range(0, len(todo), chunk):
                ids = todo[start:start + chunk]
                out = await client.generate(generate_request(
                    [render_prompt(tokenizer, records[i]) for i in ids], [record_images(records[i]) for i in ids],
                    n=samples, temperature=1.0, top_p=0.95, top_k=50, max_tokens=r.max_tokens,
                    seed=derive_seed(config.seed, "offline", ids[0])))
                flat = [(i, s) for i, group in zip(ids, out.samples, strict=True) for s in group]
                verdicts = verify_responses(tokenizer, config.verifier_for, [s.token_ids for _, s in flat],
                                            [records[i] for i, _ in flat])
                for k, i in enumerate(ids):
                    done[i] = sum(v.correct for v in verdicts[k * samples:(k + 1) * samples])
                    row = {"index": i, "passes": done[i], "samples": samples, "key": record_key(records[i])}
                    log.write(json.dumps(row) + "\n")
                log.flush()
                bar.update(len(ids))
    return [done[i] for i in range(len(records))]


def write_balanced(records: list[dict], counts: list[int], samples: int, cap: int, out: Path,
                   seed: int) -> dict:
    counts_arr = np.asarray(counts)
    before = pass_count_histogram(counts_arr, samples)
    shape = histogram_shape(before)
    factors = upsample_factors(before, shape, cap)
    order = upsample(counts_arr, factors, np.random.default_rng(seed))
    out.write_text("".join(json.dumps({**records[i], "pass_count": int(counts[i])}) + "\n" for i in order))
    after = pass_count_histogram(counts_arr[order], samples)
    summary = {"samples": samples, "shape": shape, "cap": cap, "prompts": len(records), "written": len(order),
               "factors": factors.tolist(), "before": before.tolist(), "after": after.tolist()}
    out.with_suffix(".hist.json").write_text(json.dumps(summary, indent=1))
    plot_histograms(summary, out.with_suffix(".hist.png"))
    return summary


def plot_histograms(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = np.arange(summary["samples"] + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(bins - 0.2, summary["before"], width=0.4, label="before")
    ax.bar(bins + 0.2, summary["after"], width=0.4, label="after (upsampled)")
    ax.set_xlabel(f"pass count c(q) out of {summary['samples']}")
    ax.set_ylabel("prompts")
    ax.set_title(f"offline difficulty balancing ({summary['shape']}-shaped, cap {summary['cap']}x)")
    ax.set_xticks(bins)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def run_offline_balance(config: RunConfig, in_path: Path, out: Path, samples: int, cap: int) -> dict:
    records = load_records([in_path], set(config.teachers))
    progress = out.with_suffix(".progress.jsonl")
    counts = await estimate_pass_counts(config, records, samples, progress)
    return write_balanced(records, counts, samples, cap, out, config.seed)
