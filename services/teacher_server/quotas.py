"""Per-team quotas: response tokens per minute (a token bucket) and requests in flight, with usage counters.

Admission has two steps, so that a refused request costs the other teams nothing. Before its body is read or parsed
a request `enter`s: it takes one of the team's `max_concurrent` slots (parsing counts as in flight) and is refused
while the team's bucket is empty or still short of what its last refused request asked for (a team that was told to
wait cannot make the server parse body after body meanwhile). Once parsed and validated it is `charge`d its tokens,
before it is queued. The ticket is released when the request ends; the tokens of a request that got no scores (a full
queue, a failed scorer, a client that went away) are given back. Pure accounting: the clock is injected
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
    owed: int = 0  # tokens of the last refused request: none of the team's bodies is parsed until the bucket has them
    in_flight: int = 0
    requests: int = 0
    scored_tokens: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


@dataclass
class Ticket:
    team: Team
    state: _State
    tokens: int = 0
    open: bool = True
    scored: bool = False  # the request got its scores (its tokens count as used)


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

    def enter(self, team: Team) -> Ticket:
        """Take a concurrency slot before the request's body is read, or raise without taking anything: when the
        slots are taken, or the bucket is empty or short of the tokens the team's last refused request asked for."""
        st = self._state(team)
        tpm, slots = team.tokens_per_minute, team.max_concurrent
        if slots is not None and st.in_flight >= slots:
            self._reject(team.name, st, "max_concurrent")
            raise QuotaExceeded("max_concurrent", 1, f"team {team.name}: {st.in_flight} requests in flight; "
                                                     f"max_concurrent is {slots}")
        if tpm is not None:
            need = max(1, min(st.owed, tpm))
            if st.level < need:
                self._reject(team.name, st, "tokens_per_minute")
                raise QuotaExceeded("tokens_per_minute", self._wait(st, need, tpm),
                                    f"team {team.name}: {int(st.level)} tokens left of tokens_per_minute {tpm}, "
                                    f"{need} needed before another request is read")
            st.owed = 0
        st.in_flight += 1
        return Ticket(team, st)

    def charge(self, ticket: Ticket, tokens: int) -> None:
        """Take the parsed request's `tokens` from its team's bucket, or raise (the caller releases the ticket)."""
        team, st = ticket.team, ticket.state
        self._refill(st, team.tokens_per_minute)
        tpm = team.tokens_per_minute
        if tpm is not None and tokens > tpm:  # never passes: the team's minute is spent on it, so its next body
            st.level, st.owed = 0.0, tpm      # is read once the bucket is full again
            raise OverQuota(f"team {team.name}: request scores {tokens} tokens; tokens_per_minute is {tpm}")
        if tpm is not None:
            if tokens > st.level:
                st.owed = tokens
                self._reject(team.name, st, "tokens_per_minute")
                wait = self._wait(st, tokens, tpm)
                raise QuotaExceeded("tokens_per_minute", wait,
                                    f"team {team.name}: request scores {tokens} tokens, {int(st.level)} left of "
                                    f"tokens_per_minute {tpm}; enough again in {wait} s")
            st.level -= tokens
        ticket.tokens = tokens
        st.requests += 1
        self._stats.admitted(team.name)

    def admit(self, team: Team, tokens: int) -> Ticket:
        """`enter` then `charge`, for a request whose size is known before it is admitted."""
        ticket = self.enter(team)
        try:
            self.charge(ticket, tokens)
        except (QuotaExceeded, OverQuota):
            self.release(ticket, scored=False)
            raise
        return ticket

    @staticmethod
    def _wait(st: _State, tokens: int, tpm: int) -> int:
        return max(1, math.ceil((tokens - st.level) * 60 / tpm))

    def release(self, ticket: Ticket, scored: bool) -> None:
        """The request ended: free its slot; count its tokens if it got scores, else give them back."""
        if not ticket.open:
            return
        ticket.open = False
        st = ticket.state
        st.in_flight -= 1
        if scored:
            st.scored_tokens += ticket.tokens
            self._stats.scored(ticket.team.name, ticket.tokens)
        elif st.capacity is not None and ticket.tokens:
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
