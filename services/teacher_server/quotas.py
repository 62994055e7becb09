"""Per-team quotas: response tokens per minute (a token bucket) and requests in flight, with usage counters.

The service admits a request after validating it and before queueing it, so a refused request costs its team nothing
and never reaches the batcher. The ticket is released when the request ends; the tokens of a request that got no
scores (a full queue, a failed scorer, a client that went away) are given back. Pure accounting: the clock is injected
and Prometheus sits behind the `QuotaStats` hook. State is kept by team name, so a reload of the keys file that keeps
a team keeps its usage, and changed limits apply to the next request.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from proto.schemas import TeamLimits, TeamUsage
from services.common.auth import Team


class QuotaExceeded(Exception):
    """A limit is reached now; `retry_after` is the whole seconds until the request could pass (>= 1)."""

    def __init__(self, limit: str, retry_after: int, message: str) -> None:
        super().__init__(message)
        self.limit, self.retry_after = limit, retry_after


class OverQuota(Exception):
    """The request alone asks for more tokens than the team may score in a minute: no wait would let it pass."""


class QuotaStats:
    """Hook the metrics module implements, so this module has no Prometheus import."""

    def admitted(self, team: str) -> None: ...

    def rejected(self, team: str, reason: str) -> None: ...

    def scored(self, team: str, tokens: int) -> None: ...


@dataclass
class _State:
    capacity: int | None = None  # tokens_per_minute the bucket was last filled at
    level: float = 0.0  # tokens that may be requested now
    stamp: float = 0.0  # when `level` was last brought up to date
    in_flight: int = 0
    requests: int = 0
    scored_tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class Ticket:
    team: str
    tokens: int
    state: _State
    open: bool = True


class Quotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic, stats: QuotaStats | None = None) -> None:
        self._clock = clock
        self._stats = stats or QuotaStats()
        self._teams: dict[str, _State] = {}

    def _refill(self, st: _State, capacity: int | None) -> None:
        """Bring the bucket up to now at its old rate, then to the team's current limit (a new limit starts full)."""
        now = self._clock()
        if st.capacity is not None:
            st.level = min(st.capacity, st.level + (now - st.stamp) * st.capacity / 60)
        if capacity != st.capacity:
            if st.capacity is None:
                st.level = capacity
            elif capacity is not None:
                st.level = min(st.level, capacity)
            st.capacity = capacity
        st.stamp = now

    def _state(self, team: Team) -> _State:
        st = self._teams.setdefault(team.name, _State())
        self._refill(st, team.tokens_per_minute)
        return st

    def admit(self, team: Team, tokens: int) -> Ticket:
        """Take `tokens` from the team's bucket and a concurrency slot, or raise without taking anything."""
        st = self._state(team)
        tpm, slots = team.tokens_per_minute, team.max_concurrent
        if tpm is not None and tokens > tpm:
            raise OverQuota(f"team {team.name}: request scores {tokens} tokens; tokens_per_minute is {tpm}")
        if slots is not None and st.in_flight >= slots:
            self._reject(team.name, st, "max_concurrent")
            raise QuotaExceeded("max_concurrent", 1, f"team {team.name}: {st.in_flight} requests in flight; "
                                                     f"max_concurrent is {slots}")
        if tpm is not None:
            if tokens > st.level:
                wait = max(1, math.ceil((tokens - st.level) * 60 / tpm))
                self._reject(team.name, st, "tokens_per_minute")
                raise QuotaExceeded("tokens_per_minute", wait,
                                    f"team {team.name}: request scores {tokens} tokens, {int(st.level)} left of "
                                    f"tokens_per_minute {tpm}; enough again in {wait} s")
            st.level -= tokens
        st.in_flight += 1
        st.requests += 1
        self._stats.admitted(team.name)
        return Ticket(team.name, tokens, st)

    def release(self, ticket: Ticket, scored: bool) -> None:
        """The request ended: free its slot; count its tokens if it got scores, else give them back."""
        if not ticket.open:
            return
        ticket.open = False
        st = ticket.state
        st.in_flight -= 1
        if scored:
            st.scored_tokens += ticket.tokens
            self._stats.scored(ticket.team, ticket.tokens)
        elif st.capacity is not None:
            self._refill(st, st.capacity)
            st.level = min(st.capacity, st.level + ticket.tokens)

    def reject(self, team: Team, reason: str) -> None:
        """Count a refusal decided elsewhere (the batcher's full queue)."""
        self._reject(team.name, self._state(team), reason)

    def _reject(self, name: str, st: _State, reason: str) -> None:
        st.rejected[reason] = st.rejected.get(reason, 0) + 1
        self._stats.rejected(name, reason)

    def usage(self, team: Team) -> TeamUsage:
        st = self._state(team)
        limits = TeamLimits(tokens_per_minute=team.tokens_per_minute, max_concurrent=team.max_concurrent,
                            weight=team.weight)
        available = None if st.capacity is None else int(st.level)
        return TeamUsage(team=team.name, limits=limits, requests=st.requests, scored_tokens=st.scored_tokens,
                         rejected=dict(st.rejected), in_flight=st.in_flight, tokens_available=available)
