"""Synthetic visual: count the shapes of one color or kind in a 64×64 picture, for the tiny vision-language model.

Why these scenes: the tiny VLM sees 64×64 images in 8×8 patches and trains for minutes on a CPU, so a scene is a few
filled squares and circles (10..13 px, 2..3 patches across) in three saturated colors on white. Shapes sit one per
cell of a 4×4 grid of 16-px cells, jittered inside the cell with a white margin, so they never overlap or touch and
stay inside the image; what the question asks is always visible.

Why two styles: `list` names every matching shape in reading order ("Red square, red circle. The answer is 2."),
`count` states the count ("I count 2 red shapes. The answer is 2."). Both are correct and a teacher trained on one
scores the other low (docs/method.md §4, first failure mode). Both end with "The answer is N.", and records carry the
answer like math records do, so the math verifier (trainer/verifiers/math.py) checks them.

Why wrong answers look right: a slip miscounts by one (never below zero) and the rest of the text agrees with it: in
`list` one matching shape is left out or named twice, in `count` both numbers move together.

Difficulty: the level is the number of shapes in the scene (1..MAX_LEVEL). More shapes mean more distractors and
larger counts; a level-1 scene is a one-glance answer.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

STYLES = ("list", "count")
MAX_LEVEL = 6
IMAGE_SIZE = 64
IMAGE_TOKEN = "<image>"
GRID = 4
CELL = IMAGE_SIZE // GRID
MIN_SIZE, MAX_SIZE = 10, 13
MARGIN = 1  # white pixels kept on each side of a cell: shapes in neighbouring cells are ≥ 2 px apart
KINDS = ("square", "circle")
COLORS = {"red": (220, 20, 20), "green": (20, 150, 20), "blue": (20, 40, 220)}
QUESTION_MIX = (("color", 0.45), ("kind", 0.35), ("all", 0.20))
ABSENT_TARGET_P = 0.1  # how often a color/kind question may ask about something that is not in the picture


@dataclass(frozen=True)
class Shape:
    kind: str  # square | circle
    color: str  # red | green | blue
    cell: int  # 0..GRID*GRID-1, row-major
    dx: int  # offset of the bounding box inside the cell
    dy: int
    size: int  # bounding-box side in pixels

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bounding box (x0, y0, x1, y1)."""
        x0, y0 = (self.cell % GRID) * CELL + self.dx, (self.cell // GRID) * CELL + self.dy
        return x0, y0, x0 + self.size - 1, y0 + self.size - 1

    def name(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class VisualTask:
    shapes: tuple[Shape, ...]
    target_color: str | None = None  # at most one of target_color / target_kind; neither = count all shapes
    target_kind: str | None = None

    def __post_init__(self) -> None:
        if self.target_color is not None and self.target_kind is not None:
            raise ValueError("ask about a color or a kind, not both")
        if self.target_color not in (None, *COLORS) or self.target_kind not in (None, *KINDS):
            raise ValueError(f"unknown target {self.target_color or self.target_kind!r}")
        if len({s.cell for s in self.shapes}) != len(self.shapes):
            raise ValueError("two shapes in one cell")
        for s in self.shapes:
            if s.kind not in KINDS or s.color not in COLORS or not 0 <= s.cell < GRID * GRID:
                raise ValueError(f"bad shape {s}")
            if min(s.dx, s.dy) < MARGIN or max(s.dx, s.dy) + s.size > CELL - MARGIN:
                raise ValueError(f"shape leaves its cell: {s}")

    @property
    def level(self) -> int:
        return len(self.shapes)

    def matches(self, shape: Shape) -> bool:
        return self.target_color in (None, shape.color) and self.target_kind in (None, shape.kind)

    def matching(self) -> list[Shape]:
        """Matching shapes in reading order (row by row, left to right)."""
        return sorted((s for s in self.shapes if self.matches(s)), key=lambda s: s.cell)

    @property
    def answer(self) -> int:
        return len(self.matching())

    def noun(self, count: int) -> str:
        """"red shapes", "square", "shapes"... agreeing with `count`."""
        plural = count != 1
        if self.target_kind:
            return self.target_kind + ("s" if plural else "")
        word = "shapes" if plural else "shape"
        return f"{self.target_color} {word}" if self.target_color else word

    def prompt(self) -> str:
        return f"{IMAGE_TOKEN}\nHow many {self.noun(2)} are in the picture?"

    def render(self) -> Image.Image:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
        draw = ImageDraw.Draw(image)
        for s in self.shapes:
            (draw.rectangle if s.kind == "square" else draw.ellipse)(s.box, fill=COLORS[s.color])
        return image

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.render().save(buf, format="PNG")
        return buf.getvalue()

    def image_name(self) -> str:
        return f"{hashlib.sha256(self.png()).hexdigest()[:16]}.png"

    def solution(self, style: str, slip: int | None = None, rng: random.Random | None = None) -> str:
        """A counting answer; `slip` (+1 or -1) miscounts by one, never below zero (-1 on an empty count becomes +1)."""
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if slip not in (None, 0, 1, -1):
            raise ValueError(f"slip must be +1 or -1, got {slip!r}")
        rng = rng or random
        names = [s.name() for s in self.matching()]
        if slip and (slip > 0 or not names):  # one shape named twice, or one that is not there
            if names:
                extra = rng.choice(names)
            else:
                extra = f"{self.target_color or rng.choice(list(COLORS))} {self.target_kind or rng.choice(KINDS)}"
            names.insert(rng.randint(0, len(names)), extra)
        elif slip:  # one shape left out
            names.pop(rng.randrange(len(names)))
        count = len(names)
        if style == "list":
            text = ", ".join(names).capitalize() + "." if names else "None."
        else:
            text = f"I count {count} {self.noun(count)}."
        return f"{text} The answer is {count}."

    def record(self) -> dict:
        return {"domain": "visual", "prompt": self.prompt(), "answer": str(self.answer), "level": self.level,
                "images": [self.image_name()]}


def sample_task(rng: random.Random, level: int) -> VisualTask:
    """`level` shapes in distinct random cells; the question asks mostly about a color or kind in the picture."""
    if not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be in 1..{MAX_LEVEL}, got {level}")
    shapes = []
    for cell in sorted(rng.sample(range(GRID * GRID), level)):
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        dx, dy = (rng.randint(MARGIN, CELL - MARGIN - size) for _ in range(2))
        shapes.append(Shape(rng.choice(KINDS), rng.choice(list(COLORS)), cell, dx, dy, size))
    question = rng.choices([q for q, _ in QUESTION_MIX], [w for _, w in QUESTION_MIX])[0]
    if question == "all":
        return VisualTask(tuple(shapes))
    anything = rng.random() < ABSENT_TARGET_P
    if question == "color":
        target = rng.choice(list(COLORS)) if anything else rng.choice(shapes).color
        return VisualTask(tuple(shapes), target_color=target)
    target = rng.choice(KINDS) if anything else rng.choice(shapes).kind
    return VisualTask(tuple(shapes), target_kind=target)


def sample_tasks(seed: int, n: int, levels: tuple[int, ...] = tuple(range(1, MAX_LEVEL + 1))) -> list[VisualTask]:
    rng = random.Random(f"visual-{seed}")
    return [sample_task(rng, rng.choice(levels)) for _ in range(n)]
