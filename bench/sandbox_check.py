"""What one code verdict costs: a passing candidate and its tests, run through the real sandbox (trainer.sandbox).

    python bench/sandbox_check.py [--checks 40] [--repeats 3]

A code-domain training step verifies each distinct code rollout this way, so the per-check cost bounds how fast a
step can go. Reported: wall milliseconds per sequential check (median over the checks, then mean ± std over the
repeats) and the CPU milliseconds the sandbox processes used per check (from the children's rusage).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from trainer.verifiers import code

RECORD = {"tests": "assert double(2) == 4\nassert double(-3) == -6\n"}
COMPLETION = "```python\ndef double(x):\n    return x * 2\n```"


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_repeat(checks: int) -> tuple[float, float]:
    """(median wall ms, CPU ms per check)."""
    walls, cpu0 = [], children_cpu_s()
    for _ in range(checks):
        start = time.perf_counter()
        if not code.check(COMPLETION, RECORD, timeout_s=10.0):
            raise SystemExit("the benchmark's candidate failed its tests: the sandbox is broken here")
        walls.append(time.perf_counter() - start)
    return statistics.median(walls) * 1e3, (children_cpu_s() - cpu0) / checks * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    one_repeat(3)  # warm the page cache
    walls, cpus = zip(*(one_repeat(args.checks) for _ in range(args.repeats)), strict=True)
    print(f"{args.checks} checks x {args.repeats} repeats")
    print(f"wall ms per check: {statistics.mean(walls):.1f} ± {statistics.stdev(walls):.1f}")
    print(f"sandbox CPU ms per check: {statistics.mean(cpus):.1f} ± {statistics.stdev(cpus):.1f}")


if __name__ == "__main__":
    main()
