"""Rule-based outcome verifiers: R(q, τ) ∈ {0, 1} per domain (docs/method.md §1), used only for data balancing and
margin calibration. A verifier that fails or times out counts as "incorrect".

A domain is one module with a `check(completion, record, timeout_s) -> bool` function, registered below (or at
run time with `register`). `check` returns the verdict and raises for anything that is not a verdict (crash,
timeout, sandbox refusal): `verify` turns that into Verdict(False, error).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from trainer.verifiers import choice, code, math

Check = Callable[[str, dict, float], bool]

_VERIFIERS: dict[str, Check] = {"choice": choice.check, "code": code.check, "math": math.check}


@dataclass(frozen=True)
class Verdict:
    correct: bool
    error: str | None = None  # set when the verifier crashed / timed out / the sandbox refused; then correct is False


def register(kind: str, check: Check) -> None:
    """Add a domain; a name clash is a programming error, not something to silently override."""
    if kind in _VERIFIERS:
        raise ValueError(f"verifier {kind!r} is already registered")
    _VERIFIERS[kind] = check


def verifier_kinds() -> list[str]:
    return sorted(_VERIFIERS)


def verify(kind: str, completion: str, record: dict, timeout_s: float = 10.0) -> Verdict:
    """Verify one completion. Unknown kind => ValueError (a config error); anything else never raises."""
    check = _lookup(kind)
    try:
        return Verdict(bool(check(completion, record, timeout_s)))
    except Exception as exc:
        return Verdict(False, f"{type(exc).__name__}: {exc}")


def verify_batch(kind_per_item: list[str], completions: list[str], records: list[dict],
                 timeout_s: float = 10.0, max_workers: int = 4) -> list[Verdict]:
    """Verify many completions concurrently (threads: code runs in subprocesses, math in worker processes). Each
    distinct (kind, completion, record) is verified once: a peaked model repeats itself within a prompt's group,
    and a code check is a sandboxed process (the same record object is the same record)."""
    if not len(kind_per_item) == len(completions) == len(records):
        raise ValueError("kind_per_item, completions and records must have the same length")
    for kind in set(kind_per_item):
        _lookup(kind)  # fail on a config error before doing any work
    keys = [(kind, text, id(record)) for kind, text, record in zip(kind_per_item, completions, records, strict=True)]
    first: dict[tuple, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    todo = list(first.values())
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo)))) as pool:
        verdicts = pool.map(verify, [kind_per_item[i] for i in todo], [completions[i] for i in todo],
                            [records[i] for i in todo], [timeout_s] * len(todo))
        by_key = dict(zip([keys[i] for i in todo], verdicts, strict=True))
    return [by_key[key] for key in keys]


def _lookup(kind: str) -> Check:
    try:
        return _VERIFIERS[kind]
    except KeyError:
        raise ValueError(f"unknown verifier kind {kind!r}; known: {verifier_kinds()}") from None
