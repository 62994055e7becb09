"""A request's rows (prompts × n samples) in waves under a memory budget.

What one sampling batch holds grows with its rows × their padded length (KV cache) and its rows × the vocabulary (a
step's logits and probabilities), not with the tokens a request asks for: 4096 prompts × n 64 × 8 tokens, inside
every token limit, grew one transformers `generate` call to 7 GB. A generator samples a request in waves whose
estimated peak stays within the budget, one after another, and concatenates them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from proto.errors import ApiError

MIB = 1 << 20
DEFAULT_BATCH_MEMORY_MB = 1024


@dataclass(frozen=True)
class RowCost:
    """Bytes one row of a batch holds at its peak: `per_position` for each position of its padded sequence (prompt and
    new tokens: KV cache, activations, ids), and `per_row` once (a step's logits and what is computed from them)."""

    per_position: int
    per_row: int

    def of(self, width: int, max_tokens: int) -> int:
        return (width + max_tokens) * self.per_position + self.per_row


@dataclass(frozen=True)
class Segment:
    """Samples `first` .. `first + count - 1` of prompt `prompt`."""

    prompt: int
    first: int
    count: int


def plan_waves(lengths: Sequence[int], n: int, max_tokens: int, cost: RowCost, budget: int) -> list[list[Segment]]:
    """Consecutive rows, prompt-major, packed greedily into waves whose rows × `cost` at the wave's longest prompt
    (rows are padded to it) is at most `budget` bytes. A row that no wave can hold is refused (413 naming its
    prompt) before anything is sampled."""
    waves: list[list[Segment]] = []
    wave: list[Segment] = []
    rows = width = 0
    for i, length in enumerate(lengths):
        first = 0
        while first < n:
            wider = max(width, length)
            room = budget // cost.of(wider, max_tokens) - rows
            if room <= 0:
                if not wave:
                    raise ApiError(413, "request_too_large", f"prompts[{i}] has {length} tokens: one sample of it "
                                   f"with max_tokens {max_tokens} needs ~{cost.of(length, max_tokens)} bytes, more "
                                   f"than one batch may hold ({budget} bytes, the server's --max-batch-memory-mb): "
                                   "shorten it or ask for fewer tokens", f"prompts[{i}]")
                waves.append(wave)
                wave, rows, width = [], 0, 0
                continue
            count = min(room, n - first)
            wave.append(Segment(i, first, count))
            rows, width, first = rows + count, wider, first + count
    return [*waves, wave] if wave else waves


def wave_rows(wave: Sequence[Segment]) -> Iterator[tuple[int, int]]:
    """(prompt, sample) of each row of a wave, in order."""
    for s in wave:
        for j in range(s.first, s.first + s.count):
            yield s.prompt, j
