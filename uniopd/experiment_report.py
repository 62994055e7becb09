"""Turns an experiment directory into results.json and a markdown report with plots; every number in the report
comes from the run logs, so `uniopd experiment report` regenerates it without training again."""

from __future__ import annotations

import json
import math
import os
import platform
from collections import defaultdict
from pathlib import Path

import numpy as np

from trainer.run_log import read_log
from uniopd.experiment_plan import (
    DOMAINS,
    METHODS,
    PLANS,
    SETTINGS,
    Plan,
    balanced_dir,
    is_done,
    read_timings,
    run_dir,
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return float(np.mean(vals)), float(np.std(vals))


def _run(run_dir: Path) -> dict:
    rows = read_log(run_dir / "metrics.jsonl", kind=None)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    returns = [r for r in rows if r["kind"] == "returns"]
    start = evals[0]["time"] if evals else (train[0]["time"] if train else 0.0)
    calib_keys = ("violation_fraction", "misorder_rate", "violation_fraction_after", "misorder_rate_after",
                  "margin_before", "margin_after", "mean_lambda", "num_masked")
    calib = {k: _mean_std([r.get(f"calib/{k}") for r in train])[0] for k in calib_keys}
    balance = {k.removeprefix("balance/"): float(np.nansum([r.get(k) or 0 for r in train]))
               for k in sorted({k for r in train for k in r if k.startswith("balance/")})}
    return {
        "wall_s": json.loads((run_dir / "done.json").read_text())["wall_s"],
        "evals": [{"step": r["step"], "elapsed_s": r["time"] - start,
                   **{d: r[f"{d}/accuracy"] for d in DOMAINS if f"{d}/accuracy" in r}} for r in evals],
        "train_accuracy": [{"step": r["step"], **{d: r.get(f"{d}/accuracy") for d in DOMAINS}} for r in train],
        "calib": calib,
        "balance": balance,
        "step_s": _mean_std([r.get("time/step") for r in train])[0],
        "teacher_clip_fraction": _mean_std([r.get("train/teacher_clip_fraction") for r in train])[0],
        "wire_bytes": _mean_std([r.get("teachers/bytes_sent", math.nan) + r.get("teachers/bytes_received", math.nan)
                                 for r in train])[0],
        "returns": {k: [x for r in returns for x in r[k]] for k in ("correct", "G", "G_calibrated", "in_loss")},
    }


def _finished_runs(out: Path, plan: Plan) -> dict:
    runs = defaultdict(dict)
    for setting, method in plan.runs:
        for seed in plan.seeds:
            if is_done(out, setting, method, seed):
                runs[f"{setting}/{method}"][seed] = _run(run_dir(out, setting, method, seed))
    return dict(runs)


def collect(out: Path, plan: Plan) -> dict:
    """Everything the report needs. The tuning plan's runs (its own seeds) are reported beside any other plan's."""
    runs = _finished_runs(out, plan)
    tuning = _finished_runs(out, PLANS["tuning"]) if plan != PLANS["tuning"] else {}
    balance = {d if student == "student" else f"{d}, {student}": json.loads(p.read_text())
               for student in plan.students for d in DOMAINS
               if (p := balanced_dir(out, student) / f"{d}_train.hist.json").exists()}
    teachers, sharpened = (json.loads(p.read_text()) if (p := out / name).exists() else {}
                           for name in ("teachers.json", "sharpened.json"))
    timings = read_timings(out / "timings.json")
    return {"plan": {k: getattr(plan, k) for k in plan.__dataclass_fields__}, "runs": runs, "tuning": tuning,
            "balance": balance,
            "teachers": teachers, "sharpened": sharpened, "timings": timings,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()}}


# ---- tables ----------------------------------------------------------------------------------------------------

def _fmt(mean: float, std: float, scale: float = 100.0) -> str:
    return "–" if math.isnan(mean) else f"{mean * scale:.1f} ± {std * scale:.1f}"


def _final(seeds: dict, domain: str, index: int = -1) -> list[float]:
    return [r["evals"][index].get(domain, math.nan) for r in seeds.values() if r["evals"]]


def teacher_level(results: dict, setting: str) -> dict[str, float]:
    t = results["teachers"]
    return {d: _mean_std(t.get(name, {}).get(f"{d}/accuracy", []))[0] for d, name in SETTINGS[setting].items()}


def steps_to_teacher(seeds: dict, target: dict[str, float]) -> tuple[list[int | None], list[float | None]]:
    """First eval step (and seconds since the step-0 eval) where every domain is at or above its teacher."""
    steps, secs = [], []
    for r in seeds.values():
        hit = next((e for e in r["evals"] if all(e.get(d, -1) >= target[d] for d in target)), None)
        steps.append(None if hit is None else hit["step"])
        secs.append(None if hit is None else hit["elapsed_s"])
    return steps, secs


def setting_runs(results: dict, setting: str) -> dict[str, dict]:
    """method -> seed -> run, for one setting."""
    return {k.split("/", 1)[1]: v for k, v in results["runs"].items() if k.startswith(setting + "/")}


def before_after(results: dict, setting: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Held-out accuracy (mean, std over seeds) per domain: "before" (the step-0 evaluation of every run of the
    setting), then each method's last evaluation, in METHODS order."""
    runs = setting_runs(results, setting)
    domains = list(SETTINGS[setting])
    rows = {"before": {d: _mean_std([x for s in runs.values() for x in _final(s, d, 0)]) for d in domains}} \
        if runs else {}
    rows.update({m: {d: _mean_std(_final(runs[m], d)) for d in domains} for m in METHODS if m in runs})
    return rows


def accuracy_table(results: dict, setting: str) -> list[str]:
    domains = list(SETTINGS[setting])
    lines = [f"| method | {' | '.join(domains)} | wall time per run |", "|---|" + "---|" * (len(domains) + 1)]
    rows = before_after(results, setting)
    if "before" in rows:
        lines.append(f"| student before training | {' | '.join(_fmt(*rows['before'][d]) for d in domains)} | |")
    for d_name in sorted(set(SETTINGS[setting].values())):
        accs = results["teachers"].get(d_name, {})
        cells = [_fmt(*_mean_std(accs.get(f"{d}/accuracy", []))) if SETTINGS[setting][d] == d_name else "·"
                 for d in domains]
        lines.append(f"| teacher: {d_name} | {' | '.join(cells)} | |")
    runs = setting_runs(results, setting)
    for method in (m for m in rows if m != "before"):
        wall = _mean_std([r["wall_s"] for r in runs[method].values()])
        lines.append(f"| {method} | {' | '.join(_fmt(*rows[method][d]) for d in domains)} | {wall[0]:.0f} s |")
    return lines


def calibration_table(results: dict, setting: str) -> list[str]:
    lines = ["| method | violating groups before | after | mis-ordered pairs before | after | mean margin before |"
             " after | λ (mean) | masked / step |", "|---|" + "---|" * 8]
    for method in METHODS:
        seeds = results["runs"].get(f"{setting}/{method}")
        if not seeds or method == "grpo":
            continue
        c = {k: _mean_std([r["calib"][k] for r in seeds.values()]) for k in next(iter(seeds.values()))["calib"]}
        pct = [_fmt(*c[k]) for k in ("violation_fraction", "violation_fraction_after", "misorder_rate",
                                      "misorder_rate_after")]
        raw = [_fmt(*c[k], scale=1.0) for k in ("margin_before", "margin_after", "mean_lambda", "num_masked")]
        lines.append(f"| {method} | {' | '.join(pct)} | {' | '.join(raw)} |")
    return lines


def speed_table(results: dict, setting: str) -> list[str]:
    target = teacher_level(results, setting)
    lines = ["| method | seeds reaching teacher level | eval step reached (mean) | wall time to reach (mean) |",
             "|---|---|---|---|"]
    for method in ("opd", "uniopd", "grpo"):
        seeds = results["runs"].get(f"{setting}/{method}")
        if not seeds:
            continue
        steps, secs = steps_to_teacher(seeds, target)
        reached = [s for s in steps if s is not None]
        t = [s for s in secs if s is not None]
        lines.append(f"| {method} | {len(reached)} / {len(steps)} | "
                     f"{np.mean(reached):.1f} | {np.mean(t):.0f} s |" if reached else
                     f"| {method} | 0 / {len(steps)} | not within {results['plan']['steps']} steps | – |")
    return lines


def _gap_closed(run: dict, target: dict[str, float]) -> list[dict[str, float]]:
    """Per eval, per domain: the share of the student-to-teacher gap closed since this run's step-0 evaluation (NaN
    where there is no gap: a student that starts at its teacher's level, as undertrained quick models can)."""
    start = run["evals"][0]
    return [{d: (e[d] - start[d]) / gap if (gap := target[d] - start[d]) else math.nan for d in target}
            for e in run["evals"]]


def gap_table(results: dict, setting: str) -> list[str]:
    """What share of the gap to the teachers each method closes, and what reaching half of it cost, next to the RFT
    that made the teachers (which closes all of it by construction)."""
    target, plan = teacher_level(results, setting), results["plan"]
    domains = list(target)
    per_step = plan["prompts_per_step"] * plan["samples_per_prompt"]
    lines = [f"| method | gap closed at step {plan['steps']}: {', '.join(domains)} | seeds at half the gap "
             "(every domain) | step | rollouts | wall time |", "|---|---|---|---|---|---|"]
    for method, seeds in setting_runs(results, setting).items():
        closed = [_gap_closed(r, target) for r in seeds.values() if r["evals"]]
        last = ", ".join(_fmt(*_mean_std([c[-1][d] for c in closed])) for d in domains)
        hits = [next(((r["evals"][i]["step"], r["evals"][i]["elapsed_s"]) for i, g in enumerate(c)
                      if all(g[d] >= 0.5 for d in domains)), None) for r, c in zip(seeds.values(), closed, strict=True)]
        hit = [h for h in hits if h is not None]
        step = np.mean([h[0] for h in hit]) if hit else math.nan
        cost = f"{step:.0f} | {step * per_step:.0f} | {np.mean([h[1] for h in hit]):.0f} s" if hit else "– | – | –"
        lines.append(f"| {method} | {last} | {len(hit)} / {len(hits)} | {cost} |")
    for name, rounds in sorted(results.get("sharpened", {}).items()):
        if name in SETTINGS[setting].values():
            lines.append(f"| RFT that made {name} (from the student) | 100 (by construction) | – | "
                         f"{sum(r['sft_steps'] for r in rounds)} SFT steps, {len(rounds)} rounds | "
                         f"{sum(r['samples'] for r in rounds)} samples | {sum(r['s'] for r in rounds):.0f} s |")
    return lines


def tuning_table(results: dict) -> list[str]:
    """The clip / teacher-signal sweep on the tuning plan's seeds: last-step accuracy, how much the clip acted."""
    runs = results.get("tuning", {})
    domains = list(SETTINGS["multi-teacher"])
    lines = [f"| method | {' | '.join(domains)} | response tokens beyond the clip | step time |",
             "|---|" + "---|" * (len(domains) + 2)]
    for key, seeds in runs.items():
        accs = [_fmt(*_mean_std(_final(seeds, d))) for d in domains]
        clipped = _mean_std([r["teacher_clip_fraction"] for r in seeds.values()])[0]
        step = _mean_std([r["step_s"] for r in seeds.values()])[0]
        lines.append(f"| {key.split('/', 1)[1]} | {' | '.join(accs)} | {clipped * 100:.3f}% | {step:.2f} s |")
    return lines


SIGNALS = {"opd": "sampled token", "opd-topk8": "top-8 + tail", "opd-topk32": "top-32 + tail",
           "opd-full": "full distribution"}


def signal_table(results: dict, setting: str) -> list[str]:
    """What each teacher signal bought and cost: last-step accuracy, step time, scoring bytes on the wire."""
    runs = setting_runs(results, setting)
    domains = list(SETTINGS[setting])
    lines = [f"| teacher signal | {' | '.join(domains)} | step time | scoring bytes a step (sent + received) |",
             "|---|" + "---|" * (len(domains) + 2)]
    for method, label in SIGNALS.items():
        if method not in runs:
            continue
        seeds = runs[method]
        accs = [_fmt(*_mean_std(_final(seeds, d))) for d in domains]
        step = _mean_std([r["step_s"] for r in seeds.values()])
        wire = _mean_std([r["wire_bytes"] for r in seeds.values()])
        lines.append(f"| {label} (`{method}`) | {' | '.join(accs)} | {step[0]:.2f} ± {step[1]:.2f} s | "
                     f"{wire[0] / 1024:,.0f} KiB |")
    return lines


def sharpening_table(results: dict) -> list[str]:
    """Each sharpened teacher's RFT from the student: what it cost and how its pass rate on fresh prompts moved."""
    lines = ["| teacher | RFT rounds | samples generated | SFT steps | wall time | pass rate, first → last round |",
             "|---|---|---|---|---|---|"]
    for name, rounds in sorted(results.get("sharpened", {}).items()):
        lines.append(f"| {name} | {len(rounds)} | {sum(r['samples'] for r in rounds)} | "
                     f"{sum(r['sft_steps'] for r in rounds)} | {sum(r['s'] for r in rounds):.0f} s | "
                     f"{rounds[0]['pass_rate'] * 100:.1f} → {rounds[-1]['pass_rate'] * 100:.1f} |")
    return lines


# ---- plots -----------------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, setting: str, path: Path) -> Path:
    plt = _plt()
    domains = list(SETTINGS[setting])
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 3.8), squeeze=False)
    target = teacher_level(results, setting)
    for ax, d in zip(axes[0], domains, strict=True):
        for method in METHODS:
            seeds = results["runs"].get(f"{setting}/{method}")
            if not seeds:
                continue
            steps = [e["step"] for e in next(iter(seeds.values()))["evals"]]
            acc = np.array([[e.get(d, np.nan) for e in r["evals"]] for r in seeds.values()]) * 100
            mean, std = np.nanmean(acc, 0), np.nanstd(acc, 0)
            ax.plot(steps, mean, marker="o", label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.12)
        ax.axhline(target[d] * 100, color="k", ls="--", lw=1, label="teacher")
        ax.set_title(f"{setting}: {d}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_balance(results: dict, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, len(results["balance"]), figsize=(5.5 * len(results["balance"]), 3.5), squeeze=False)
    for ax, (d, h) in zip(axes[0], results["balance"].items(), strict=True):
        bins = np.arange(h["samples"] + 1)
        ax.bar(bins - 0.2, h["before"], width=0.4, label="before")
        ax.bar(bins + 0.2, h["after"], width=0.4, label="after")
        ax.set_title(f"{d}: {h['shape']}-shaped, {h['prompts']} → {h['written']} prompts")
        ax.set_xlabel(f"student pass count out of {h['samples']}")
        ax.set_xticks(bins)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_returns(results: dict, setting: str, path: Path) -> Path:
    """G of correct vs incorrect rollouts: vanilla OPD's (uncalibrated) and Uni-OPD's before and after the shift."""
    plt = _plt()
    panels = []
    for method, key, title in (("opd", "G", "OPD"), ("uniopd", "G", "Uni-OPD, before calibration"),
                               ("uniopd", "G_calibrated", "Uni-OPD, after calibration")):
        seeds = results["runs"].get(f"{setting}/{method}")
        if seeds:
            g = np.array([x for r in seeds.values() for x in r["returns"][key]], dtype=float)
            ok = np.array([x for r in seeds.values() for x in r["returns"]["correct"]], dtype=bool)
            panels.append((title, g, ok))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.5), squeeze=False)
    for ax, (title, g, ok) in zip(axes[0], panels, strict=False):
        bins = np.linspace(np.nanpercentile(g, 1), np.nanpercentile(g, 99), 40)
        ax.hist(g[ok], bins=bins, alpha=0.6, density=True, label=f"correct (n={ok.sum()})")
        ax.hist(g[~ok], bins=bins, alpha=0.6, density=True, label=f"incorrect (n={(~ok).sum()})")
        ax.set_title(title)
        ax.set_xlabel("G(τ) = token-mean advantage")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the document ----------------------------------------------------------------------------------------------

def write_report(results: dict, doc: Path, command: str, notes: Path | None = None) -> Path:
    figs = doc.parent / doc.stem
    figs.mkdir(parents=True, exist_ok=True)
    plan = results["plan"]
    settings = [s for s in SETTINGS if any(k.startswith(s + "/") for k in results["runs"])]
    t = results["timings"]
    lines = [
        "# Miniature reproduction of Uni-OPD on trained tiny experts", "",
        "Generated by `uniopd experiment report` from the run logs; do not edit by hand.", "",
        f"- Command: `{command}`",
        f"- Machine: {results['machine']['cpus']} CPU cores, {results['machine']['platform']}, "
        f"Python {results['machine']['python']}; no GPU.",
        f"- Wall time: {sum(i['total_s'] for i in t) / 60:.1f} min in all, of which "
        f"{sum(i['prepare_s'] for i in t) / 60:.1f} min preparing models and data"
        + (f", over {len(t)} invocations that trained {', '.join(str(i.get('trained', '?')) for i in t)} runs."
           if len(t) > 1 else "."),
        f"- Seeds: {', '.join(map(str, plan['seeds']))}; {plan['steps']} optimizer steps of "
        f"{plan['prompts_per_step']} prompts × {plan['samples_per_prompt']} rollouts; lr {plan['lr']}; "
        f"held-out accuracy = mean over k = {plan['eval_samples']} samples (temperature 1, top-p 1) of "
        f"{plan['n_eval']} prompts per domain, every {plan['eval_every']} steps. Numbers are mean ± std over seeds, "
        "in percent.", "",
    ]
    if notes and notes.exists():
        lines += [notes.read_text().strip(), ""]
    if results.get("sharpened"):
        lines += ["## How the domain teachers were made", "",
                  "Each is the student's checkpoint sharpened on its domain by rejection-sampling fine-tuning "
                  "(uniopd/sharpen.py); the pass rate is the model's own, on each round's fresh prompts, before that "
                  "round's update:", "", *sharpening_table(results), ""]
    for setting in settings:
        lines += [f"## {setting}", "", "Held-out accuracy at the last step:", "", *accuracy_table(results, setting), ""]
        curve = plot_curves(results, setting, figs / f"curves-{setting}.png")
        lines += [f"![accuracy vs step]({figs.name}/{curve.name})", ""]
        if setting in ("multi-teacher", "cross-modal") or len(settings) == 1:
            lines += ["Order consistency (per step, mean over steps and seeds; 'before' is the raw OPD return G):", "",
                      *calibration_table(results, setting), "",
                      "Steps to teacher-level held-out accuracy (every domain at or above its teacher's mean):", "",
                      *speed_table(results, setting), "",
                      "Share of the student-to-teacher gap closed (per seed from its own step-0 evaluation; 100 = "
                      "teacher level), and the cost of reaching half of it, beside the cost of making the teachers:",
                      "", *gap_table(results, setting), ""]
            g = plot_returns(results, setting, figs / f"returns-{setting}.png")
            lines += [f"![G of correct vs incorrect rollouts]({figs.name}/{g.name})", ""]
        if sum(m in SIGNALS for m in setting_runs(results, setting)) > 1:
            lines += ["What each teacher signal bought and cost (last-step held-out accuracy; mean step time; the "
                      "teachers' request and response bodies per step, msgpack, including cache misses only):", "",
                      *signal_table(results, setting), ""]
    if results.get("tuning"):
        seeds = sorted({s for v in results["tuning"].values() for s in v})
        lines += ["## Choosing the clip and the teacher signal", "",
                  f"Vanilla OPD on the multi-teacher setting, seeds {', '.join(map(str, seeds))} (not used anywhere "
                  f"else in this report), {PLANS['tuning'].steps} steps; last-step held-out accuracy:", "",
                  *tuning_table(results), ""]
    if results["balance"]:
        b = plot_balance(results, figs / "offline-balance.png")
        lines += ["## Offline difficulty balancing", "",
                  "Pass counts of the initial student on the training prompts, before and after upsampling:", "",
                  f"![pass-count histograms]({figs.name}/{b.name})", ""]
    doc.write_text("\n".join(lines) + "\n")
    return doc
