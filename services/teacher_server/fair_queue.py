"""Per-team FIFO queues served by deficit round robin (DRR) over tokens, so one team's flood cannot starve another.

Teams with queued entries take turns; at the start of its turn a team is credited `quantum × weight` tokens and
serves entries from its head while their cost fits its credit; the rest of the credit carries over to its next turn,
and a team whose queue empties leaves the round with no credit. Over time each busy team gets tokens in proportion
to its weight, whatever the size or number of its requests, and a newcomer is served within one round.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Lane(Generic[T]):
    weight: int
    entries: deque[tuple[T, int]] = field(default_factory=deque)
    credit: int = 0


class FairQueue(Generic[T]):
    def __init__(self, quantum: int) -> None:
        self.quantum = max(1, quantum)
        self.tokens = 0  # cost of everything queued
        self._lanes: dict[str, _Lane[T]] = {}
        self._order: deque[str] = deque()  # teams with entries; the first one has the turn
        self._turn_open = False  # whether the first team was already credited for its current turn

    def __bool__(self) -> bool:
        return bool(self._order)

    def push(self, team: str, weight: int, entry: T, cost: int) -> None:
        lane = self._lanes.get(team)
        if lane is None:
            lane = self._lanes[team] = _Lane(weight)
            self._order.append(team)
        lane.weight = weight
        lane.entries.append((entry, cost))
        self.tokens += cost

    def _head(self) -> _Lane[T]:
        """The lane whose first entry is next: turns pass until a team's credit covers its first entry's cost."""
        while True:
            lane = self._lanes[self._order[0]]
            if not self._turn_open:
                lane.credit += self.quantum * lane.weight
                self._turn_open = True
            if lane.entries[0][1] <= lane.credit:
                return lane
            self._order.rotate(-1)
            self._turn_open = False

    def peek(self) -> tuple[T, int]:
        """The next entry and its cost, without taking it (it stays next until popped)."""
        return self._head().entries[0]

    def pop(self) -> T:
        lane = self._head()
        entry, cost = lane.entries.popleft()
        lane.credit -= cost
        self.tokens -= cost
        if not lane.entries:
            del self._lanes[self._order.popleft()]
            self._turn_open = False
        return entry
