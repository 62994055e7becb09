"""Synthetic math: multi-step arithmetic word problems with worked solutions in two styles.

Why two styles: the first failure mode of docs/method.md §4 needs correct solutions that a teacher trained on one
style scores low. `steps` writes each operation as an equation ("7+5=12."); `running` narrates a running total
("add 5, get 12."). Both end with "The answer is N." so one verifier (trainer/verifiers/math.py) checks either.

Why wrong answers look right: a slip in one step ("7+5=13.") is one wrong digit among many right tokens, and every
later step is consistent with it, so a teacher scores the whole trajectory almost as well as a correct one.

Difficulty: the level is the number of operations (1..MAX_LEVEL); level ≥ 3 may contain a "k bags of m" step
(a small multiplication). Per-step errors compound, which spreads pass counts toward both ends (a U or J histogram).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STYLES = ("steps", "running")
MAX_LEVEL = 4
MAX_TOTAL = 30
_NAMES = ("Ann", "Bob", "Cy", "Dee", "Eve", "Max", "Sam", "Tom")
_ITEMS = ("apples", "pens", "books", "coins", "cards")


@dataclass(frozen=True)
class Op:
    kind: str  # add | sub | bags
    n: int
    m: int = 1

    @property
    def value(self) -> int:
        return self.n * self.m if self.kind == "bags" else self.n

    def apply(self, total: int) -> int:
        return total - self.value if self.kind == "sub" else total + self.value


@dataclass(frozen=True)
class MathTask:
    name: str
    item: str
    start: int
    ops: tuple[Op, ...]

    @property
    def level(self) -> int:
        return len(self.ops)

    @property
    def answer(self) -> int:
        total = self.start
        for op in self.ops:
            total = op.apply(total)
        return total

    def prompt(self) -> str:
        parts = [f"{self.name} has {self.start} {self.item}."]
        for op in self.ops:
            if op.kind == "add":
                parts.append(f"Then buys {op.n} more.")
            elif op.kind == "sub":
                parts.append(f"Then gives {op.n} away.")
            else:
                parts.append(f"Then gets {op.n} bags of {op.m}.")
        parts.append(f"How many {self.item} now?")
        return " ".join(parts)

    def solution(self, style: str, slip: int | None = None, rng: random.Random | None = None,
                 misread: int | None = None) -> str:
        """A worked solution; `slip` = index of an operation computed wrongly by ±1..2, `misread` = index of an
        operation whose operand is read off the prompt wrongly (±1..2, a bag size ±1) and then computed right; later
        steps stay consistent with either."""
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        total, lines = self.start, [] if style == "steps" else [f"Start with {self.start}."]
        for i, op in enumerate(self.ops):
            if i == misread:
                op = _misread(op, rng or random)
            new = op.apply(total)
            if i == slip:
                new += (rng or random).choice((-2, -1, 1, 2))
            if style == "steps":
                if op.kind == "bags":
                    lines.append(f"{op.n}*{op.m}={op.value}.")
                sign = "-" if op.kind == "sub" else "+"
                lines.append(f"{total}{sign}{op.value}={new}.")
            else:
                verb = {"add": f"add {op.n}", "sub": f"take {op.n}", "bags": f"add {op.n} times {op.m}"}[op.kind]
                lines.append(f"{verb.capitalize()}, get {new}.")
            total = new
        lines.append(f"The answer is {total}.")
        return " ".join(lines)

    def record(self) -> dict:
        return {"domain": "math", "prompt": self.prompt(), "answer": str(self.answer), "level": self.level}


def _misread(op: Op, rng: random.Random) -> Op:
    """The operation with another operand (never 0, never the right one): what a misreading of the prompt gives."""
    if op.kind == "bags":
        return Op(op.kind, op.n, op.m + 1 if op.m == 1 else op.m + rng.choice((-1, 1)))
    return Op(op.kind, op.n + rng.choice((1, 2)) if op.n <= 2 else op.n + rng.choice((-2, -1, 1, 2)))


def sample_task(rng: random.Random, level: int) -> MathTask:
    """Totals stay in 0..MAX_TOTAL and operands are single digits, so a tiny model can learn the arithmetic."""
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in 1..{MAX_LEVEL}, got {level}")
    start = rng.randint(2, 15)
    total, ops = start, []
    for _ in range(level):
        kinds = ["add", "sub"] + (["bags"] if level >= 3 else [])
        kind = rng.choice(kinds)
        op = Op(kind, rng.randint(2, 3), rng.randint(2, 4)) if kind == "bags" else Op(kind, rng.randint(1, 6))
        if not 0 <= op.apply(total) <= MAX_TOTAL:
            op = Op("sub", rng.randint(1, min(6, total))) if total > MAX_TOTAL // 2 else Op("add", rng.randint(1, 6))
        total = op.apply(total)
        ops.append(op)
    return MathTask(rng.choice(_NAMES), rng.choice(_ITEMS), start, tuple(ops))


def sample_tasks(seed: int, n: int, levels: tuple[int, ...] = tuple(range(1, MAX_LEVEL + 1))) -> list[MathTask]:
    rng = random.Random(f"math-{seed}")
    return [sample_task(rng, rng.choice(levels)) for _ in range(n)]
