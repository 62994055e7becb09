"""Synthetic code: write `f(x)` from input/output examples; verified by hidden tests run in the sandbox.

Why two styles: `def` ("def f(x):\\n    return 2*x+3") and `lambda` ("f = lambda x: 2*x+3") are both correct, and a
teacher that only saw one scores the other low (docs/method.md §4, first failure mode).

Why wrong answers look right: an off-by-one constant ("2*x+4") differs from a correct program in one token; a
program fitted to the shown examples only (a lookup) passes what the prompt shows and fails the hidden tests.

Difficulty: the function family. Level 1 `x+b`, 2 `a*x`, 3 `a*x+b`, 4 `x*x+b`, 5 `a*x*x+b`; levels ≥ 3 need two
constants read off the examples, level ≥ 4 needs recognising a non-linear pattern.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STYLES = ("def", "lambda")
MAX_LEVEL = 5
SHOWN = (0, 1, 2, 3)
HIDDEN = (4, 5, 6, 7, 10)


@dataclass(frozen=True)
class CodeTask:
    level: int
    a: int
    b: int

    def f(self, x: int) -> int:
        quad = self.level >= 4
        return self.a * (x * x if quad else x) + self.b

    def expression(self, a: int | None = None, b: int | None = None) -> str:
        a, b = self.a if a is None else a, self.b if b is None else b
        term = "x*x" if self.level >= 4 else "x"
        term = term if a == 1 else f"{a}*{term}"
        return term if b == 0 else f"{term}+{b}"

    def prompt(self) -> str:
        shown = ", ".join(f"f({x})={self.f(x)}" for x in SHOWN)
        return f"Write a Python function f(x) with {shown}."

    def solution(self, style: str, slip: bool = False, rng: random.Random | None = None) -> str:
        """A program; `slip` makes one constant off by one (the program still looks right)."""
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        a, b = self.a, self.b
        if slip:
            if self.b and (rng or random).random() < 0.5:
                b += (rng or random).choice((-1, 1))
            else:
                a += 1
        body = self.expression(a, b)
        return f"def f(x):\n    return {body}" if style == "def" else f"f = lambda x: {body}"

    def record(self) -> dict:
        """Hidden cases, judged outside the sandbox (trainer/verifiers/code.py); the same as assert tests too."""
        tests = "\n".join(f"assert f({x}) == {self.f(x)}" for x in HIDDEN)
        return {"domain": "code", "prompt": self.prompt(), "tests": tests, "entry_point": "f", "level": self.level,
                "cases": [[[x], self.f(x)] for x in HIDDEN]}


def sample_task(rng: random.Random, level: int) -> CodeTask:
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in 1..{MAX_LEVEL}, got {level}")
    a = 1 if level in (1, 4) else rng.randint(2, 9)
    b = 0 if level == 2 else rng.randint(1, 19)
    return CodeTask(level, a, b)


def sample_tasks(seed: int, n: int, levels: tuple[int, ...] = tuple(range(1, MAX_LEVEL + 1))) -> list[CodeTask]:
    rng = random.Random(f"code-{seed}")
    return [sample_task(rng, rng.choice(levels)) for _ in range(n)]
