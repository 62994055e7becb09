"""The embedded demo (the README's first command): the "demo" plan of the experiment — vanilla OPD and Uni-OPD, both
with top-8 teacher supervision, distilling the math and code teachers into the weak student, a before/after table
per domain, and plots."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from uniopd.experiment import Experiment
from uniopd.experiment_plan import PLANS
from uniopd.experiment_report import before_after, plot_curves, plot_returns, teacher_level


def summary_table(results: dict, setting: str = "multi-teacher") -> str:
    teacher = teacher_level(results, setting)
    rows = [f"{'held-out accuracy (%)':<26}" + "".join(f"{d:>10}" for d in teacher)]
    for name, acc in before_after(results, setting).items():
        label = "student before training" if name == "before" else f"after {name}"
        rows.append(f"{label:<26}" + "".join(f"{acc[d][0] * 100:>10.1f}" for d in teacher))
    rows.append(f"{'teacher':<26}" + "".join(f"{teacher[d] * 100:>10.1f}" for d in teacher))
    return "\n".join(rows)


def run_demo(out: Path, cache: Path, teacher_backend: str, rollout_backend: str, redis_url: str | None,
             steps: int | None = None, quick: bool = False) -> dict:
    plan = PLANS["demo"]
    if quick:  # undertrained models and a small data set: a fast check that every part runs
        plan = replace(plan, quick_models=True, n_train=24, n_eval=8, eval_samples=2)
    if steps is not None:
        plan = replace(plan, steps=steps, eval_every=min(plan.eval_every, steps))
    results = Experiment(plan, out, cache, teacher_backend, rollout_backend, redis_url).run()
    figs = out / "plots"
    figs.mkdir(exist_ok=True)
    curves = plot_curves(results, "multi-teacher", figs / "accuracy.png")
    returns = plot_returns(results, "multi-teacher", figs / "returns.png")
    print()
    print(summary_table(results))
    print(f"\nplots: {curves}, {returns}\nrun logs (metrics.jsonl, TensorBoard): {out / 'runs'}")
    return results
