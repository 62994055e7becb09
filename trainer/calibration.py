"""Teacher-perspective outcome-guided margin calibration of Uni-OPD (docs/method.md §4). Pure functions.

Shapes: `advantages` and `mask` are (B, T) tensors; mask ≠ 0 on the tokens that carry a return. Only those tokens ever
change under a shift. `group` (length B ints) is each sample's prompt; `correct` (length B floats) is 1.0 = correct,
0.0 = incorrect, NaN = no verdict (any other value, e.g. -1, also reads as no verdict; see trainer/balancing.py).
G = `trajectory_returns` (token mean of A under the mask). A sample with no verdict, or with no masked-in token (its G
is pinned at 0, so no shift can move it), is in neither S+ nor S−: it never changes and counts toward no margin.
Ties: a (correct, incorrect) pair is mis-ordered only if G+ < G−; G+ = G− counts as ordered, so a group violates order
consistency iff its minmax margin is < 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trainer.balancing import SCOPES, scope_units, split_verdicts
from trainer.opd import trajectory_returns

MODES = ("mean", "minmax")
METHODS = ("shift", "mask", "none")
DIRECTIONS = ("lift", "push", "spread")
_SHARES = {"lift": (1.0, 0.0), "push": (0.0, 1.0), "spread": (0.5, 0.5)}  # (share of λ added to S+, taken from S−)


@dataclass(frozen=True)
class CalibrationSpec:
    """How to calibrate: `method` shift (needs `direction` and δ), mask (needs δ; ρ is the retention ratio) or none
    (measure only); `mode` mean | minmax margin; `scope` group | global units. Checked once, where it is built."""

    method: str = "none"
    mode: str = "mean"
    scope: str = "group"
    direction: str | None = None
    delta: float | None = None
    rho: float = 0.25

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.method != "none" and self.delta is None:
            raise ValueError(f"delta (the target margin δ) is required for method {self.method!r}")
        if self.method == "shift" and self.direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS} for method 'shift', got {self.direction!r}")
        if not 0 <= self.rho <= 1:
            raise ValueError(f"rho must lie in [0, 1], got {self.rho!r}")


def margin(returns_pos: np.ndarray, returns_neg: np.ndarray, mode: str) -> float | None:
    """mean: mean G+ − mean G−; minmax: min G+ − max G−. None when either set is empty."""
    pos, neg = np.asarray(returns_pos, dtype=np.float64), np.asarray(returns_neg, dtype=np.float64)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if pos.size == 0 or neg.size == 0:
        return None
    if mode == "mean":
        return float(pos.mean() - neg.mean())
    return float(pos.min() - neg.max())


def shift_offsets(returns: np.ndarray, pos: np.ndarray, neg: np.ndarray, units: list[np.ndarray], *, mode: str,
                  direction: str, delta: float) -> tuple[np.ndarray, list[float]]:
    """Per-sample amount to add to every masked-in token, and the λ = δ − m of each unit with m < δ.

    G moves by exactly the per-sample offset, and each set moves as a whole, so both margins move by λ to δ."""
    up, down = _SHARES[direction]
    offsets = np.zeros(len(returns))
    lambdas = []
    for unit in units:
        p, n = unit[pos[unit]], unit[neg[unit]]
        m = margin(returns[p], returns[n], mode)
        if m is None or m >= delta:
            continue
        lam = delta - m
        offsets[p] += up * lam
        offsets[n] -= down * lam
        lambdas.append(lam)
    return offsets, lambdas


def greedy_mask(returns: np.ndarray, pos_idx: np.ndarray, neg_idx: np.ndarray, *, mode: str, delta: float,
                rho: float = 0.25) -> np.ndarray:
    """Indices one unit removes: drop the worst correct / best incorrect, one at a time, while that raises m < δ.

    Floors k± = max(1, ⌊ρ·|S±|⌋) use the unit's starting sizes. When both removals give the same new margin, the
    incorrect one is removed (ties go to S−). Sorting is stable, so equal returns are removed in index order."""
    p = pos_idx[np.argsort(returns[pos_idx], kind="stable")]  # ascending: worst correct first
    n = neg_idx[np.argsort(-returns[neg_idx], kind="stable")]  # descending: best incorrect first
    k_pos, k_neg = max(1, math.floor(rho * len(p) + 1e-9)), max(1, math.floor(rho * len(n) + 1e-9))
    i = j = 0  # heads removed from p and n
    m = margin(returns[pos_idx], returns[neg_idx], mode)  # in the given order: the same m as shift and stats
    while m is not None and m < delta:
        options = []
        if len(n) - j > k_neg:
            options.append((margin(returns[p[i:]], returns[n[j + 1:]], mode), 0))
        if len(p) - i > k_pos:
            options.append((margin(returns[p[i + 1:]], returns[n[j:]], mode), 1))
        if not options:
            break
        best, from_pos = max(options, key=lambda o: o[0])  # first maximum: S− wins ties
        if not best > m:
            break
        m, i, j = best, i + from_pos, j + 1 - from_pos
    return np.concatenate([p[:i], n[:j]]).astype(np.int64)


def order_consistency(returns: np.ndarray, group: np.ndarray, pos: np.ndarray,
                      neg: np.ndarray) -> tuple[float, float, int]:
    """(fraction of mixed groups with min G+ < max G−, fraction of within-group (correct, incorrect) pairs with
    G+ < G−, number of mixed groups). Always per prompt group; NaN when there is no mixed group."""
    violating = misordered = pairs = mixed = 0
    for unit in scope_units(group, "group"):
        gp, gn = returns[unit[pos[unit]]], returns[unit[neg[unit]]]
        if gp.size == 0 or gn.size == 0:
            continue
        mixed += 1
        violating += int(gp.min() < gn.max())
        misordered += int((gp[:, None] < gn[None, :]).sum())
        pairs += gp.size * gn.size
    if mixed == 0:
        return math.nan, math.nan, 0
    return violating / mixed, misordered / pairs, mixed


@dataclass
class CalibrationStats:
    """Logged every step. "Before" values use the incoming advantages; means over an empty set are NaN."""
    mean_return_correct: float  # before
    mean_return_incorrect: float  # before
    margin_before: float  # mean unit margin (chosen mode and scope) over units with both sets
    margin_after: float  # the same on the calibrated advantages, masked samples left out
    violation_fraction: float  # before; mixed prompt groups with minmax margin < 0, whatever the scope
    misorder_rate: float  # before; within-group (correct, incorrect) pairs with G+ < G− (ties are ordered)
    violation_fraction_after: float  # the same two on the calibrated returns, masked samples left out
    misorder_rate_after: float
    mixed_groups: int
    units: int  # units with both S+ and S−
    units_shifted: int
    mean_lambda: float  # over shifted units
    num_masked: int


def _mean_margin(returns: np.ndarray, pos: np.ndarray, neg: np.ndarray, units: list[np.ndarray],
                 mode: str) -> tuple[float, int]:
    margins = [margin(returns[u[pos[u]]], returns[u[neg[u]]], mode) for u in units]
    margins = [m for m in margins if m is not None]
    return (float(np.mean(margins)) if margins else math.nan), len(margins)


def _nanmean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else math.nan


def calibrate(advantages: torch.Tensor, mask: torch.Tensor, group: np.ndarray, correct: np.ndarray,
              spec: CalibrationSpec) -> tuple[torch.Tensor, np.ndarray, CalibrationStats]:
    """Margin calibration of one batch: (new advantages, boolean per-sample `masked`, stats).

    Shift and mask are exclusive, so `masked` is all False unless the method is "mask"; the caller zeroes the loss
    mask of `masked` samples."""
    if not len(group) == len(correct) == advantages.shape[0] or advantages.shape != mask.shape:
        raise ValueError("advantages and mask must be (B, T); group and correct must have length B")
    method, mode, delta = spec.method, spec.mode, spec.delta
    with torch.no_grad():
        returns = trajectory_returns(advantages, mask).double().cpu().numpy()
        has_tokens = (mask != 0).any(-1).cpu().numpy()
    pos, neg = split_verdicts(correct)
    pos, neg = pos & has_tokens, neg & has_tokens
    units = scope_units(group, spec.scope)
    masked, lambdas, new = np.zeros(len(returns), dtype=bool), [], advantages
    with torch.no_grad():
        if method == "shift":
            offsets, lambdas = shift_offsets(returns, pos, neg, units, mode=mode, direction=spec.direction,
                                            delta=delta)
            offsets = torch.as_tensor(offsets, dtype=advantages.dtype, device=advantages.device)[:, None]
            new = torch.where(mask != 0, advantages + offsets, advantages)
        elif method == "mask":
            for u in units:
                masked[greedy_mask(returns, u[pos[u]], u[neg[u]], mode=mode, delta=delta, rho=spec.rho)] = True
            new = advantages.masked_fill(torch.as_tensor(masked, device=advantages.device)[:, None], 0.0)
        returns_after = trajectory_returns(new, mask).double().cpu().numpy()
    before, n_units = _mean_margin(returns, pos, neg, units, mode)
    after, _ = _mean_margin(returns_after, pos & ~masked, neg & ~masked, units, mode)
    violation, misorder, mixed = order_consistency(returns, group, pos, neg)
    violation_after, misorder_after, _ = order_consistency(returns_after, group, pos & ~masked, neg & ~masked)
    stats = CalibrationStats(_nanmean(returns[pos]), _nanmean(returns[neg]), before, after, violation, misorder,
                             violation_after, misorder_after, mixed, n_units, len(lambdas), _nanmean(lambdas),
                             int(masked.sum()))
    return new, masked, stats
