"""Wall-clock timing of the named parts of a step."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def timed(name: str, times: dict[str, float]) -> Iterator[None]:
    """times[name] = seconds spent in the block (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        times[name] = time.perf_counter() - start


def teacher_wait(times: dict[str, float], old_first: bool) -> float:
    """Seconds a step waited on its teachers alone. Verification and π_old start together and scoring runs beside
    both, unless π_old had to come first (top-k supervision scores π_old's candidates): then scoring runs beside what
    is left of verification. Only scoring's excess over what runs beside it is exposed."""
    beside = max(0.0, times["verify"] - times["old_logprobs"]) if old_first else max(times["verify"],
                                                                                     times["old_logprobs"])
    return max(0.0, times["score"] - beside)


async def timed_await(name: str, times: dict[str, float], work: Awaitable[T]) -> T:
    """`await work`, timed: for parts of a step that overlap under asyncio.gather."""
    with timed(name, times):
        return await work
