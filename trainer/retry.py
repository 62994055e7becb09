"""When a failed call to a server is tried again: full-jitter backoff, at least a number of times, then for as long
as a time budget allows (a server's restart and model load), shared by the rollout session and the teacher router."""

from __future__ import annotations

from dataclasses import dataclass


def backoff_delay(attempt: int, base_s: float, cap_s: float, u: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempt)); `u` in [0, 1) is the caller's random draw."""
    return u * min(cap_s, base_s * 2.0**attempt)


def check_retry_waits(retry_budget_s: float, backoff_s: float) -> None:
    """A retry budget with no backoff would retry in a busy loop for the whole budget."""
    if retry_budget_s > 0 and backoff_s <= 0:
        raise ValueError(f"retry_budget_s is {retry_budget_s:g} s but backoff_s is 0: its retries would never wait "
                         "(give backoff_s > 0, or retry_budget_s: 0 for `retries` alone)")


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed call is tried again: `retries` times at least, and after those for as long as the calls have
    been failing for less than `budget_s`, which should cover a server's restart and model load. Each wait is full
    jitter under `cap_s`, so the last attempt comes at most a cap (and an attempt) after the budget is spent.

    A count alone did not cover a restart: six full-jitter retries wait 30.5 s on average and less than 25 s one time
    in three, so a rollout server that took 20-25 s to come back ended one run in three."""

    retries: int
    backoff_s: float
    cap_s: float
    budget_s: float = 0.0

    def __post_init__(self) -> None:
        check_retry_waits(self.budget_s, self.backoff_s)

    def wait(self, retry: int, failing_s: float, u: float) -> float | None:
        """Seconds to wait before retry `retry` (1, 2, ...) of calls that have failed for `failing_s` seconds, or
        None: give up. `u` in [0, 1) is the caller's random draw."""
        if retry > self.retries and failing_s >= self.budget_s:
            return None
        return backoff_delay(retry - 1, self.backoff_s, self.cap_s, u)
