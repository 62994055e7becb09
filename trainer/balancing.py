"""Student-perspective data balancing of Uni-OPD (docs/method.md §2 offline, §3 online). Pure functions.

Verdicts: `correct` is a length-N float array, 1.0 = correct, 0.0 = incorrect, NaN = no verdict. Any value other than
exactly 0 or 1 (e.g. -1) also reads as no verdict. A sample with no verdict is in neither set: it is never dropped.
`group` is a length-N int array, the prompt each sample belongs to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCOPES = ("group", "global")
SHAPES = ("U", "J")
_EPS = 1e-9  # floor(x + eps): keeps decimal ratios such as 0.29 · 100 = 28.999… on the intended integer


def split_verdicts(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is_correct, is_incorrect) boolean arrays; no-verdict samples are False in both."""
    c = np.asarray(correct, dtype=np.float64)
    return c == 1, c == 0


def scope_units(group: np.ndarray, scope: str) -> list[np.ndarray]:
    """Sample indices of each unit: one unit per prompt group ("group") or the whole batch as one ("global")."""
    group = np.asarray(group)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if len(group) == 0:
        return []
    if scope == "global":
        return [np.arange(len(group))]
    _, inverse = np.unique(group, return_inverse=True)
    inverse = inverse.ravel()
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)


def _floor(x: float) -> int:
    return math.floor(x + _EPS)


# ---- §3 online correctness-aware balancing ----------------------------------------------------------------------

def balance_targets(c: int, i: int, ratio: float) -> tuple[int, int]:
    """(correct kept, incorrect kept) for a unit with c correct and i incorrect at target ratio r = correct:incorrect.

    All-correct / all-wrong units are untouched. If c > ⌊i·r⌋ ≥ 1 keep ⌊i·r⌋ correct; elif i > ⌊c/r⌋ ≥ 1 keep ⌊c/r⌋
    incorrect; else untouched. The rule read literally never fires at r = 0 or ∞ (⌊i·0⌋ = 0, ⌊c/∞⌋ = 0), so those
    are explicit: r = 0 keeps only the incorrect, r = ∞ only the correct (of mixed units)."""
    if not ratio >= 0:
        raise ValueError(f"ratio must be >= 0 (or inf), got {ratio!r}")
    if c == 0 or i == 0:
        return c, i
    if ratio == 0:
        return 0, i
    if math.isinf(ratio):
        return c, 0
    keep_c = _floor(i * ratio)
    if c > keep_c >= 1:
        return keep_c, i
    keep_i = _floor(c / ratio)
    if i > keep_i >= 1:
        return c, keep_i
    return c, i


@dataclass
class BalanceStats:
    correct_before: int
    incorrect_before: int
    correct_after: int
    incorrect_after: int
    no_verdict: int
    units_rebalanced: int  # units that lost at least one sample


def online_balance(group: np.ndarray, correct: np.ndarray, ratio: float, scope: str,
                   rng: np.random.Generator) -> tuple[np.ndarray, BalanceStats]:
    """Which samples keep their loss mask after rebalancing correct vs incorrect toward r:1 (docs/method.md §3).

    The surplus to drop is drawn uniformly at random without replacement within each unit. "Dropped" means loss
    mask 0: the caller keeps the sample in the batch statistics."""
    pos, neg = split_verdicts(correct)
    keep = np.ones(len(pos), dtype=bool)
    rebalanced = 0
    for unit in scope_units(group, scope):
        p, n = unit[pos[unit]], unit[neg[unit]]
        keep_c, keep_i = balance_targets(len(p), len(n), ratio)
        for members, k in ((p, keep_c), (n, keep_i)):
            if k < len(members):
                keep[rng.choice(members, size=len(members) - k, replace=False)] = False
        rebalanced += (keep_c, keep_i) != (len(p), len(n))
    stats = BalanceStats(int(pos.sum()), int(neg.sum()), int((pos & keep).sum()), int((neg & keep).sum()),
                         int((~pos & ~neg).sum()), rebalanced)
    return keep, stats


# ---- §2 offline difficulty-aware upsampling ---------------------------------------------------------------------

def pass_count_histogram(counts: np.ndarray, n: int) -> np.ndarray:
    """Number of prompts per pass count c ∈ {0..N} (length N + 1)."""
    counts = np.asarray(counts, dtype=np.int64)
    if n < 1 or (counts.size and (counts.min() < 0 or counts.max() > n)):
        raise ValueError(f"pass counts must lie in 0..{n} with N >= 1")
    return np.bincount(counts, minlength=n + 1)


def histogram_shape(hist: np.ndarray) -> str:
    """"U" if bin N is non-empty and at least as large as every interior bin 1..N−1, else "J" (mirrored J).

    The shape only decides whether bin N is an extreme kept once (U) or an informative bin to upsample (J); bin 0
    plays no part. With N = 1 there is no interior bin, so any non-empty bin N makes it "U"."""
    hist = np.asarray(hist)
    interior = hist[1:-1].max(initial=0)
    return "U" if hist[-1] > 0 and hist[-1] >= interior else "J"


def upsample_factors(hist: np.ndarray, shape: str, cap: int = 8) -> np.ndarray:
    """Integer copies per bin that bring each upsampled bin closest to the largest kept-once bin.

    U: bins 1..N−1 upsampled, 0 and N kept once; J: bins 1..N upsampled, 0 kept once. factor = round-half-up(target /
    count) clipped to [1, cap]; this is the factor in 1..cap whose copies land nearest the target. Empty bins get 1."""
    hist = np.asarray(hist, dtype=np.int64)
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if cap < 1 or len(hist) < 2:
        raise ValueError("cap must be >= 1 and the histogram must have N + 1 >= 2 bins")
    n = len(hist) - 1
    kept_once = [0, n] if shape == "U" else [0]
    target = hist[kept_once].max()
    factors = np.ones(n + 1, dtype=np.int64)
    for b in range(1, n if shape == "U" else n + 1):
        if hist[b] > 0:
            factors[b] = min(cap, max(1, math.floor(target / hist[b] + 0.5)))
    return factors


def upsample(counts: np.ndarray, factors: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices of the prompts to write: prompt j repeated factors[counts[j]] times (≥ 1), in original order with
    repeats adjacent, or shuffled by `rng` when given."""
    counts = np.asarray(counts, dtype=np.int64)
    factors = np.asarray(factors, dtype=np.int64)
    if factors.size and factors.min() < 1:
        raise ValueError("every factor must be >= 1: no prompt is dropped")
    indices = np.repeat(np.arange(len(counts)), factors[counts])
    return indices if rng is None else rng.permutation(indices)
