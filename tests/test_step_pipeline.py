"""The named parts of a training step, in isolation: rollouts → Batch → estimator → Uni-OPD recipe, and timing."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest
import torch

from modeling.logprobs import ResponseLogprobs, candidate_logprobs
from trainer.batch import Rollout, batch_metrics, collate
from trainer.calibration import CalibrationSpec
from trainer.data import Example
from trainer.estimators import ESTIMATORS, GRPO, OPD, FullDistributionOPD, LossRows, LossSpec, TopKOPD
from trainer.opd import trajectory_returns
from trainer.recipe import RecipeSpec, uni_opd
from trainer.timing import teacher_wait, timed, timed_await


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


def test_batch_metrics_count_the_masked_sample_and_split_by_domain():
    _, b = _batch()
    adv, mask = OPD().advantages(b)
    m = batch_metrics(b, adv, mask, uses_teacher=True)
    assert m["tokens"] == 8 and m["masked_samples"] == 1
    # the scored tokens (s0: 3, s1: 1, s3: 2) all have old log-prob −1; the teacher's sum to −7.75
    assert m["student_logprob"] == -1.0 and m["teacher_logprob"] == pytest.approx((-1.75 - 2 - 4) / 6)
    assert m["reverse_kl"] == pytest.approx(-1 - (-7.75 / 6))
    assert (m["math/accuracy"], m["code/accuracy"], m["math/samples"], m["code/samples"]) == (0.5, 0.5, 2, 2)
    assert m["math/mean_return"] == pytest.approx((1.25 / 3 - 1.0) / 2)
    assert m["code/mean_return"] == pytest.approx(-1.0)  # s3's G; the masked s2 has none (it counted as 0 before)
    assert "teacher_logprob" not in batch_metrics(b, adv, mask, uses_teacher=False)


def test_opd_masks_the_unscored_sample_instead_of_zero_filling_it():
    _, b = _batch()
    adv, mask = OPD().advantages(b)
    assert mask[2].sum() == 0 and mask[3].tolist() == [1, 1, 0]
    assert adv[0].tolist() == [0.5, 0.0, 0.75] and adv[1].tolist() == [-1.0, 0, 0] and adv[3].tolist() == [-2, 0, 0]


def test_grpo_uses_the_verdicts_and_no_teacher():
    _, b = _batch()
    adv, mask = GRPO().advantages(b)
    assert torch.equal(mask, b.valid) and GRPO.teacher_signal is None and OPD.teacher_signal == "sampled"
    # each group is one correct and one incorrect: ±1 (population std 0.5) on every real token
    assert adv[0, 0] == pytest.approx(1.0, abs=1e-5) and adv[1, 0] == pytest.approx(-1.0, abs=1e-5)
    assert adv[1, 1] == 0 and set(ESTIMATORS) == {("opd", "sampled"), ("opd", "topk"), ("opd", "full"),
                                                  ("grpo", "sampled")}


def test_collate_pads_teacher_distributions_and_rows_cut_to_a_micro_batch():
    rollouts, _ = _batch()
    for r in rollouts:
        if r.teacher is not None:
            r.teacher_dist = np.log(np.full((len(r.response), 4), 0.25, np.float32))
    b = collate(rollouts, torch.zeros(4, 3))
    assert b.teacher_dist.shape == (4, 3, 4) and b.teacher_dist[2].abs().sum() == 0  # unscored: zeros, masked
    assert b.teacher_dist[1, 0].tolist() == pytest.approx([math.log(0.25)] * 4) and b.teacher_dist[1, 1:].sum() == 0
    rows = LossRows(b.old, b.teacher, b.teacher_dist, b.old, b.old, b.valid)
    cut = rows.take(np.array([3, 1]), torch.zeros(2, 2), num_samples=4)
    assert cut.teacher_dist.shape == (2, 2, 4) and cut.mask.tolist() == [[1, 1], [1, 0]] and cut.num_samples == 4


def _student(logits: torch.Tensor, tokens: torch.Tensor) -> ResponseLogprobs:
    """A (B, T, V) logits tensor as the kernel's output for responses `tokens` (all of length T)."""
    lse = logits.logsumexp(-1)
    picked = logits.gather(-1, tokens[..., None])[..., 0] - lse
    return ResponseLogprobs(picked, [tokens.shape[1]] * tokens.shape[0], logits, lse, [0] * tokens.shape[0])


def test_full_distribution_loss_pulls_the_student_to_the_teacher_and_carries_calibration():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 6, requires_grad=True)
    tokens = torch.randint(0, 6, (3, 4))
    teacher = torch.randn(3, 4, 6).log_softmax(-1)
    student = _student(logits, tokens)
    old = student.logprobs.detach()
    mask = torch.ones(3, 4)
    zero = torch.zeros(3, 4)
    rows = LossRows(old, teacher.gather(-1, tokens[..., None])[..., 0], teacher, zero, zero, mask, num_samples=3)
    loss, stats = FullDistributionOPD().loss(student, rows, LossSpec())
    exact = float((logits.log_softmax(-1).exp() * (logits.log_softmax(-1) - teacher)).sum(-1).mean().detach())
    assert float(loss.detach()) == pytest.approx(exact, rel=1e-5) and stats.full_kl == pytest.approx(exact, 1e-5)
    (grad,) = torch.autograd.grad(loss, logits)
    with torch.no_grad():  # a small step against the gradient lowers the KL
        stepped = (logits - 0.1 * grad).log_softmax(-1)
        assert float((stepped.exp() * (stepped - teacher)).sum(-1).mean()) < exact
    # a calibration offset of +1 on sample 0 adds the PG term −ρ·1 (ρ = 1 at π_old) to its token mean
    offsets = torch.zeros(3, 4)
    offsets[0] = 1.0
    shifted = LossRows(old, rows.teacher, teacher, offsets, offsets, mask, num_samples=3)
    with_offset, _ = FullDistributionOPD().loss(_student(logits, tokens), shifted, LossSpec())
    assert float(with_offset.detach()) == pytest.approx(float(loss.detach()) - 1 / 3, rel=1e-5)



@pytest.mark.parametrize("estimator", [FullDistributionOPD(), TopKOPD()])
def test_rows_of_a_sampled_token_pool_keep_opd_inside_a_richer_run(estimator):
    """teachers.<domain>.teacher_signal: sampled — a row without a distribution or candidates is trained as OPD is,
    teacher–student clip included, and the other rows as the rich estimator trains them alone."""
    torch.manual_seed(2)
    logits = torch.randn(3, 4, 6, requires_grad=True)
    tokens = torch.randint(0, 6, (3, 4))
    teacher = torch.randn(3, 4, 6).log_softmax(-1)
    teacher[1, 0] = -30.0  # the sampled row has a token beyond the clip c = 10
    teacher[1, 0, tokens[1, 0]] = -25.0
    old = _student(logits, tokens).logprobs.detach()
    sampled = teacher.gather(-1, tokens[..., None])[..., 0]
    advantages = sampled - old
    offsets = torch.zeros(3, 4)
    offsets[2] = 0.5
    mask = torch.ones(3, 4)
    every = logits.detach().argsort(-1, descending=True)[..., :3]
    cand, tail = candidate_logprobs(teacher, every)

    def loss_of(rows: torch.Tensor, rich: torch.Tensor | None, est=estimator) -> torch.Tensor:
        row_mask = mask * rows[:, None]
        return est.loss(_student(logits, tokens), LossRows(old, sampled, teacher, advantages, offsets, row_mask,
                                                           every, cand, tail, rich, num_samples=3), LossSpec())

    rich = torch.tensor([1.0, 0.0, 1.0])
    mixed, stats = loss_of(torch.ones(3), rich)
    alone, _ = loss_of(rich, None)  # rows 0 and 2 under the rich estimator
    opd, opd_stats = loss_of(1 - rich, None, OPD())  # row 1 under sampled-token OPD
    assert float(mixed.detach()) == pytest.approx(float((alone + opd).detach()), rel=1e-5)
    assert opd_stats.teacher_clip_fraction == 0.25 and stats.teacher_clip_fraction == pytest.approx(1 / 12)
    (g_mixed,) = torch.autograd.grad(mixed, logits)
    (g_parts,) = torch.autograd.grad(loss_of(rich, None)[0] + loss_of(1 - rich, None, OPD())[0], logits)
    assert torch.allclose(g_mixed, g_parts, atol=1e-6)


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


def test_teacher_wait_is_scoring_beyond_what_runs_beside_it():
    times = {"score": 3.0, "verify": 1.0, "old_logprobs": 2.5}
    assert teacher_wait(times, old_first=False) == 0.5  # beside verification and π_old
    assert teacher_wait(times, old_first=True) == 3.0  # π_old came first and outlasted verification
    late = {**times, "verify": 4.0}  # verification started with π_old and ran 1.5 s past it, beside the scoring
    assert teacher_wait(late, old_first=True) == 1.5
    assert teacher_wait({**times, "score": 0.2}, old_first=False) == 0.0  # hidden entirely


def test_topk_loss_is_the_full_loss_at_k_vocab_and_pulls_the_student_below_it():
    """The student's top-k under π_old, scored by the teacher with a tail: at k = V the loss is the full one; at
    k = 2 a step against its gradient lowers the bucketed KL, and collate pads the candidates."""
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 6, requires_grad=True)
    tokens = torch.randint(0, 6, (3, 4))
    teacher = torch.randn(3, 4, 6).log_softmax(-1)
    old = _student(logits, tokens).logprobs.detach()
    zero, mask = torch.zeros(3, 4), torch.ones(3, 4)
    sampled = teacher.gather(-1, tokens[..., None])[..., 0]

    def rows(candidates: torch.Tensor) -> LossRows:
        cand, tail = candidate_logprobs(teacher, candidates)
        return LossRows(old, sampled, None, zero, zero, mask, candidates, cand, tail, num_samples=3)

    full_rows = LossRows(old, sampled, teacher, zero, zero, mask, num_samples=3)
    full, _ = FullDistributionOPD().loss(_student(logits, tokens), full_rows, LossSpec())
    every = logits.detach().argsort(-1, descending=True)
    at_vocab, stats = TopKOPD().loss(_student(logits, tokens), rows(every), LossSpec())
    assert float(at_vocab.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    top2 = every[..., :2]
    loss, stats = TopKOPD().loss(_student(logits, tokens), rows(top2), LossSpec())
    assert 0 < float(loss.detach()) <= float(full.detach()) and stats.full_kl == pytest.approx(float(loss.detach()))
    (grad,) = torch.autograd.grad(loss, logits)
    stepped = _student((logits - 0.1 * grad).detach(), tokens)
    assert float(TopKOPD().loss(stepped, rows(top2), LossSpec())[0]) < float(loss.detach())
    rollouts, _ = _batch()
    for r in rollouts:
        r.candidates = np.tile([[3, 1]], (len(r.response), 1))
        if r.teacher is not None:
            r.teacher_candidates = np.full((len(r.response), 2), -1.0, np.float32)
            r.teacher_tail = np.full(len(r.response), -0.5, np.float32)
    b = collate(rollouts, torch.zeros(4, 3))
    assert b.candidates.shape == (4, 3, 2) and b.candidates.dtype == torch.int64 and b.candidates[1, 1:].sum() == 0
    assert b.teacher_tail[2].abs().sum() == 0 and b.teacher_candidates[3, :2].tolist() == [[-1, -1]] * 2

