"""Data balancing (docs/method.md §3 online, §2 offline): hand-computed cases and properties."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.balancing import (
    balance_targets,
    histogram_shape,
    online_balance,
    pass_count_histogram,
    scope_units,
    split_verdicts,
    upsample,
    upsample_factors,
)

NAN = math.nan
INF = math.inf


# ---- online balancing --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("c", "i", "r", "want"), [
    (6, 2, 1.0, (2, 2)),  # ⌊2·1⌋ = 2, 6 > 2 ≥ 1: keep 2 correct
    (1, 5, 1.0, (1, 1)),  # ⌊5·1⌋ = 5, 1 > 5 no; ⌊1/1⌋ = 1, 5 > 1 ≥ 1: keep 1 incorrect
    (3, 5, 1.0, (3, 3)),  # ⌊5⌋ = 5 no; ⌊3⌋ = 3, 5 > 3: keep 3 incorrect
    (3, 4, 0.5, (2, 4)),  # ⌊4·0.5⌋ = 2, 3 > 2 ≥ 1: keep 2 correct
    (6, 5, 1.2, (6, 5)),  # ⌊5·1.2⌋ = 6, 6 > 6 no; ⌊6/1.2⌋ = 5, 5 > 5 no: untouched (already at r)
    (7, 5, 1.2, (6, 5)),  # ⌊6⌋ = 6, 7 > 6 ≥ 1: keep 6 correct
    (2, 7, 0.75, (2, 2)),  # ⌊7·0.75⌋ = 5, 2 > 5 no; ⌊2/0.75⌋ = ⌊2.67⌋ = 2, 7 > 2 ≥ 1: keep 2 incorrect
    (1, 4, 2.0, (1, 4)),  # ⌊8⌋ = 8 no; ⌊1/2⌋ = 0 fails "≥ 1": untouched
    (3, 5, 0.1, (3, 5)),  # ⌊0.5⌋ = 0 fails "≥ 1"; ⌊30⌋ = 30 no: untouched (the rule read literally)
    (3, 5, 0.0, (0, 5)),  # r = 0: only incorrect
    (3, 5, INF, (3, 0)),  # r = ∞: only correct
    (4, 0, 0.0, (4, 0)),  # all correct: untouched even at r = 0
    (0, 4, INF, (0, 4)),  # all wrong: untouched even at r = ∞
    (0, 0, 1.0, (0, 0)),
    (29, 100, 0.29, (29, 100)),  # 100 · 0.29 = 28.999… in floats; ⌊⌋ must give 29 (= c): untouched
])
def test_balance_targets_hand_computed(c, i, r, want):
    assert balance_targets(c, i, r) == want


def test_online_balance_worked_example():
    # Group 0: 6 correct, 2 incorrect, 1 no verdict → keep 2 of the 6 correct. Group 1: all correct (untouched).
    # Group 2: 1 correct, 3 incorrect → keep 1 of the 3 incorrect. Group 3: one no-verdict sample only.
    group = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    correct = np.array([1, 1, 1, 1, 1, 1, 0, 0, NAN, 1, 1, 1, 0, 0, 0, -1])
    keep, stats = online_balance(group, correct, 1.0, "group", np.random.default_rng(0))
    assert keep[:6].sum() == 2 and keep[6:11].all() and keep[11] and keep[12:15].sum() == 1 and keep[15]
    assert (stats.correct_before, stats.incorrect_before, stats.correct_after, stats.incorrect_after) == (9, 5, 5, 3)
    assert stats.no_verdict == 2 and stats.units_rebalanced == 2
    # Global scope: 9 correct, 5 incorrect → ⌊5·1⌋ = 5: keep 5 correct anywhere in the batch, all 5 incorrect.
    keep, stats = online_balance(group, correct, 1.0, "global", np.random.default_rng(0))
    assert (stats.correct_after, stats.incorrect_after, stats.units_rebalanced) == (5, 5, 1) and keep[[8, 15]].all()


def test_online_balance_is_deterministic_per_rng_and_random_across():
    group, correct = np.zeros(16, int), np.array([1.0] * 12 + [0.0] * 4)
    runs = [online_balance(group, correct, 1.0, "group", np.random.default_rng(s))[0] for s in range(6)]
    assert np.array_equal(runs[0], online_balance(group, correct, 1.0, "group", np.random.default_rng(0))[0])
    assert len({r.tobytes() for r in runs}) > 1


def test_online_balance_rejects_bad_ratio_and_scope():
    for bad in (-1.0, NAN):
        with pytest.raises(ValueError):
            online_balance(np.zeros(2, int), np.array([1.0, 0.0]), bad, "group", np.random.default_rng(0))
    with pytest.raises(ValueError):
        online_balance(np.zeros(2, int), np.array([1.0, 0.0]), 1.0, "prompt", np.random.default_rng(0))


def test_empty_batch():
    keep, stats = online_balance(np.array([], int), np.array([]), 1.0, "global", np.random.default_rng(0))
    assert keep.shape == (0,) and stats.correct_before == stats.units_rebalanced == 0


RATIOS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.2, 1.5, 2.0, 3.0, INF]


def _reference_targets(c: int, i: int, r: float) -> tuple[int, int]:
    """docs/method.md §3 in exact rational arithmetic (r as a decimal string), apart from the implementation."""
    if c == 0 or i == 0:
        return c, i
    if r == 0 or r == INF:
        return (0, i) if r == 0 else (c, 0)
    q = Fraction(str(r))
    if c > math.floor(i * q) >= 1:
        return math.floor(i * q), i
    if i > math.floor(c / q) >= 1:
        return c, math.floor(c / q)
    return c, i


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.sampled_from([1.0, 1.0, 0.0, 0.0, NAN, -1.0])), max_size=30),
       st.sampled_from(RATIOS), st.sampled_from(["group", "global"]), st.integers(0, 2**32 - 1))
def test_online_balance_properties(samples, ratio, scope, seed):
    group = np.array([g for g, _ in samples], dtype=int)
    correct = np.array([c for _, c in samples], dtype=float)
    keep, stats = online_balance(group, correct, ratio, scope, np.random.default_rng(seed))
    pos, neg = split_verdicts(correct)
    assert keep[~pos & ~neg].all()  # no-verdict samples are never dropped
    for unit in scope_units(group, scope):
        c, i = int(pos[unit].sum()), int(neg[unit].sum())
        kept = int((keep & pos)[unit].sum()), int((keep & neg)[unit].sum())
        assert kept == _reference_targets(c, i, ratio)
        if c == 0 or i == 0:
            assert keep[unit].all()  # all-correct / all-wrong units are untouched
        elif ratio == 0:
            assert kept == (0, i)
        elif ratio == INF:
            assert kept == (c, 0)
        assert kept[0] == c or kept[1] == i  # only one side ever loses samples
    assert (stats.correct_after, stats.incorrect_after) == (int((keep & pos).sum()), int((keep & neg).sum()))
    assert (stats.correct_before, stats.incorrect_before) == (int(pos.sum()), int(neg.sum()))


# ---- offline upsampling ------------------------------------------------------------------------------------------

def test_histogram_hand_computed():
    assert pass_count_histogram([0, 0, 8, 3, 3, 8, 1], 8).tolist() == [2, 1, 0, 2, 0, 0, 0, 0, 2]
    assert pass_count_histogram([], 4).tolist() == [0] * 5
    for bad, n in (([9], 8), ([-1], 8), ([0], 0)):
        with pytest.raises(ValueError):
            pass_count_histogram(bad, n)


@pytest.mark.parametrize(("hist", "shape"), [
    ([10, 2, 1, 1, 0, 1, 2, 3, 9], "U"),  # bin 8 (9) ≥ largest interior bin (3)
    ([10, 5, 3, 2, 1, 1, 0, 0, 1], "J"),  # bin 8 (1) < 5
    ([10, 3, 0, 0, 3], "U"),  # a tie with the largest interior bin counts as U
    ([10, 0, 0, 0, 0], "J"),  # nothing at N: J (nothing to upsample either way)
    ([0, 0, 0, 0, 0], "J"),
    ([10, 4], "U"),  # N = 1: no interior bin
])
def test_histogram_shape_rule(hist, shape):
    assert histogram_shape(np.array(hist)) == shape


@pytest.mark.parametrize(("hist", "shape", "cap", "want"), [
    # U: target = max(bin 0, bin 8) = 10. 10/2 = 5, 10/1 = 10 → cap 8, empty bin 4 → 1, 10/3 = 3.33 → 3.
    ([10, 2, 1, 1, 0, 1, 2, 3, 9], "U", 8, [1, 5, 8, 8, 1, 8, 5, 3, 1]),
    # J: target = bin 0 = 10. 10/5 = 2, 10/3 → 3, 10/2 = 5, 10/1 → 8 (cap), bins 6, 7 empty, bin 8: 10/1 → 8.
    ([10, 5, 3, 2, 1, 1, 0, 0, 1], "J", 8, [1, 2, 3, 5, 8, 8, 1, 1, 8]),
    ([10, 5, 3, 2, 1, 1, 0, 0, 1], "J", 4, [1, 2, 3, 4, 4, 4, 1, 1, 4]),
    ([10, 4], "J", 8, [1, 3]),  # 10/4 = 2.5 rounds half up to 3
    ([3, 20, 1], "U", 8, [1, 1, 1]),  # a bin already above the target is never reduced: factor ≥ 1
    ([0, 0, 5, 0, 0], "U", 8, [1, 1, 1, 1, 1]),  # target 0: nothing to upsample to
])
def test_upsample_factors_hand_computed(hist, shape, cap, want):
    assert upsample_factors(np.array(hist), shape, cap).tolist() == want


def test_upsample_order_and_shuffle():
    counts, factors = np.array([0, 1, 2, 1]), np.array([1, 3, 2])
    assert upsample(counts, factors).tolist() == [0, 1, 1, 1, 2, 2, 3, 3, 3]
    shuffled = upsample(counts, factors, np.random.default_rng(0))
    assert sorted(shuffled.tolist()) == [0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert np.array_equal(shuffled, upsample(counts, factors, np.random.default_rng(0)))
    with pytest.raises(ValueError):
        upsample(counts, np.array([1, 0, 1]))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.integers(0, n), max_size=200))),
       st.sampled_from(["U", "J", None]), st.integers(1, 8))
def test_upsampling_properties(n_and_counts, shape, cap):
    """Each upsampled bin gets the factor in 1..cap whose copies land nearest the target (the largest kept-once bin):
    so no bin moves away from the target, and a bin whose ideal factor target/count lies in [1, cap] ends within half
    its size of it. Every prompt is written at least once, bins 0 (and N for U) exactly once."""
    n, counts = n_and_counts
    counts = np.array(counts, dtype=int)
    hist = pass_count_histogram(counts, n)
    shape = shape or histogram_shape(hist)
    factors = upsample_factors(hist, shape, cap)
    out = upsample(counts, factors)
    assert np.array_equal(np.bincount(out, minlength=len(counts)), factors[counts])  # each prompt factor[c] times
    assert (factors >= 1).all() and (factors <= cap).all()
    kept_once = [0, n] if shape == "U" else [0]
    assert (factors[kept_once] == 1).all()
    after = pass_count_histogram(counts[out], n)
    assert np.array_equal(after, hist * factors)
    target = hist[kept_once].max()
    for b in sorted(set(range(1, n + 1)) - set(kept_once)):
        if hist[b] == 0:
            continue
        best = min(abs(hist[b] * f - target) for f in range(1, cap + 1))
        assert abs(after[b] - target) == best <= abs(hist[b] - target)
        if 1 <= target / hist[b] <= cap:
            assert abs(after[b] - target) <= hist[b] / 2
