"""The named parts of a training step, in isolation: rollouts → Batch → estimator → Uni-OPD recipe, and timing."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
import torch

from trainer.batch import Rollout, collate
from trainer.calibration import CalibrationSpec
from trainer.data import Example
from trainer.estimators import ESTIMATORS, GRPO, OPD
from trainer.opd import trajectory_returns
from trainer.recipe import RecipeSpec, uni_opd
from trainer.timing import timed, timed_await


def _rollout(group: int, response: list[int], correct: bool, teacher: list[float] | None,
             domain: str = "math") -> Rollout:
    ex = Example(record={}, domain=domain, prompt_ids=[1, 2])
    t = None if teacher is None else np.array(teacher, np.float32)
    return Rollout(ex, group, np.array(response), np.zeros(len(response), np.float32), "stop", correct, t)


def _batch():
    rollouts = [_rollout(0, [5, 6, 7], True, [-0.5, -1.0, -0.25]),
                _rollout(0, [5], False, [-2.0]),
                _rollout(1, [8, 9], True, None, "code"),  # its teacher call failed
                _rollout(1, [8, 9], False, [-3.0, -1.0], "code")]
    old = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0], [-1.0, -2.0, 0.0], [-1.0, -1.0, 0.0]])
    return rollouts, collate(rollouts, old)


def test_collate_pads_to_the_longest_response():
    _, b = _batch()
    assert b.valid.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]
    assert b.teacher.tolist() == [[-0.5, -1.0, -0.25], [-2.0, 0, 0], [0, 0, 0], [-3.0, -1.0, 0]]
    assert b.scored.tolist() == [1, 1, 0, 1] and b.group.tolist() == [0, 0, 1, 1]
    assert b.correct.tolist() == [1, 0, 1, 0] and b.domains == ["math", "math", "code", "code"]


def test_opd_masks_the_unscored_sample_instead_of_zero_filling_it():
    _, b = _batch()
    adv, mask = OPD().advantages(b)
    assert mask[2].sum() == 0 and mask[3].tolist() == [1, 1, 0]
    assert adv[0].tolist() == [0.5, 0.0, 0.75] and adv[1].tolist() == [-1.0, 0, 0] and adv[3].tolist() == [-2, 0, 0]


def test_grpo_uses_the_verdicts_and_no_teacher():
    _, b = _batch()
    adv, mask = GRPO().advantages(b)
    assert torch.equal(mask, b.valid) and not GRPO.uses_teacher and OPD.uses_teacher
    # each group is one correct and one incorrect: ±1 (population std 0.5) on every real token
    assert adv[0, 0] == pytest.approx(1.0, abs=1e-5) and adv[1, 0] == pytest.approx(-1.0, abs=1e-5)
    assert adv[1, 1] == 0 and set(ESTIMATORS) == {"opd", "grpo"}


def test_recipe_shift_reaches_delta_and_balancing_only_touches_the_loss_mask():
    adv = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0]])  # group 0: correct s0, s3; incorrect s1, s2
    mask = torch.ones_like(adv)
    group, correct = np.zeros(4, int), np.array([1.0, 0.0, 0.0, 0.0])
    spec = RecipeSpec(CalibrationSpec("shift", "mean", "group", "lift", 0.5), balance_ratio=1.0)
    out = uni_opd(adv, mask, group, correct, spec, np.random.default_rng(0))
    g = trajectory_returns(out.advantages, mask)
    # mean G+ = 0, mean G− = 4/3: λ = 0.5 + 4/3 lifts s0; balancing keeps 1 of the 3 incorrect in the loss
    assert g[0] - g[1:].mean() == pytest.approx(0.5) and out.metrics["calib/mean_lambda"] == pytest.approx(0.5 + 4 / 3)
    assert out.loss_mask.sum(-1).tolist().count(0.0) == 2 and out.loss_mask[0].tolist() == [1, 1]
    assert out.metrics["balance/incorrect_after"] == 1 and out.metrics["balance/correct_after"] == 1


def test_recipe_off_changes_nothing():
    adv = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(adv)
    out = uni_opd(adv, mask, np.repeat([0, 1], 3), np.array([1, 0, 1, 0, 0, 1.0]), RecipeSpec(),
                  np.random.default_rng(0))
    assert torch.equal(out.advantages, adv) and torch.equal(out.loss_mask, mask)
    assert not any(k.startswith("balance/") for k in out.metrics) and out.metrics["calib/num_masked"] == 0


@pytest.mark.parametrize("bad", [{"balance_ratio": -1.0}, {"balance_scope": "prompt"}])
def test_recipe_spec_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        RecipeSpec(**bad)


async def test_timed_records_each_part_also_when_it_raises():
    times: dict[str, float] = {}
    with timed("sleep", times):
        time.sleep(0.01)
    with pytest.raises(KeyError), timed("fails", times):
        raise KeyError
    assert await timed_await("wait", times, asyncio.sleep(0.01, result=7)) == 7
    assert times["sleep"] >= 0.01 and times["wait"] >= 0.01 and math.isfinite(times["fails"])
