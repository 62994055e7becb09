"""The OPD math in isolation: hand-computed cases and properties (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling.logprobs import candidate_logprobs
from trainer.opd import (
    clipped_pg_loss,
    full_reverse_kl,
    grpo_advantages,
    opd_advantages,
    topk_reverse_kl,
    trajectory_returns,
)


def test_advantages_are_teacher_minus_old_masked_and_detached():
    teacher = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, -3.0]])
    adv = opd_advantages(teacher, old, torch.tensor([[1.0, 1.0, 0.0]]))
    assert adv.tolist() == [[0.5, -1.0, 0.0]] and not adv.requires_grad


def test_returns_are_token_means_over_the_mask():
    adv = torch.tensor([[1.0, 2.0, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    assert trajectory_returns(adv, mask).tolist() == [1.5, 0.0]


def test_loss_hand_computed():
    # one sample, two tokens; ratio e^0.5 on token 0 is clipped (A > 0), token 1 unclipped (A < 0 takes the max).
    new = torch.tensor([[-0.5, -2.0]])
    old = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, -2.0]])
    teacher = torch.tensor([[-0.0, -4.0]])
    loss, stats = clipped_pg_loss(new, old, adv, teacher, torch.ones(1, 2), 0.2, 0.28, 10.0)
    token0 = max(-math.exp(0.5) * 1.0, -1.28 * 1.0)
    token1 = max(-1.0 * -2.0, -1.0 * -2.0)
    assert math.isclose(float(loss), (token0 + token1) / 2, rel_tol=1e-6)
    assert stats.clip_fraction == 0.5


def test_teacher_clip_drops_far_tokens():
    new = torch.tensor([[-1.0, -1.0]])
    teacher = torch.tensor([[-1.5, -20.0]])  # token 1 is 19 nats from the teacher: outside c = 10
    adv = torch.tensor([[1.0, 1.0]])
    loss, stats = clipped_pg_loss(new, new.clone(), adv, teacher, torch.ones(1, 2), logprob_clip=10.0)
    assert math.isclose(float(loss), -1.0 / 2) and stats.teacher_clip_fraction == 0.5


def test_microbatches_sum_to_the_batch_loss():
    torch.manual_seed(0)
    new, old, teacher = (torch.randn(6, 5) - 2 for _ in range(3))
    adv = opd_advantages(teacher, old, torch.ones(6, 5))
    mask = (torch.rand(6, 5) > 0.3).float()
    whole, _ = clipped_pg_loss(new, old, adv, teacher, mask)
    parts = sum(clipped_pg_loss(new[i:i + 2], old[i:i + 2], adv[i:i + 2], teacher[i:i + 2], mask[i:i + 2],
                                num_samples=6)[0] for i in range(0, 6, 2))
    assert torch.allclose(whole, parts)


@settings(max_examples=50)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(0, 2**31))
def test_on_policy_gradient_is_minus_advantage(b, t, seed):
    """With ρ ≡ 1 (one update per batch) the gradient w.r.t. each log-prob is −A·m / (B·|m_i|)."""
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(b, t, generator=g) - 3
    teacher = old + torch.randn(b, t, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.2).float()
    adv = opd_advantages(teacher, old, mask)
    new = old.clone().requires_grad_(True)
    loss, _ = clipped_pg_loss(new, old, adv, teacher, mask)
    loss.backward()
    want = -adv * mask / (b * mask.sum(-1, keepdim=True).clamp(min=1))
    assert torch.allclose(new.grad, want, atol=1e-6)


@given(st.integers(0, 2**31))
def test_fully_masked_sample_contributes_nothing(seed):
    g = torch.Generator().manual_seed(seed)
    new, old, teacher = (torch.randn(3, 4, generator=g) for _ in range(3))
    mask = torch.ones(3, 4)
    mask[1] = 0
    adv = opd_advantages(teacher, old, mask)
    a, _ = clipped_pg_loss(new, old, adv, teacher, mask)
    new2 = new.clone()
    new2[1] += 5.0
    b, _ = clipped_pg_loss(new2, old, adv, teacher, mask)
    assert torch.allclose(a, b)


def test_grpo_advantages_hand_computed():
    # group 7: rewards 1, 0, 0, 1 -> mean 0.5, std 0.5 -> ±1; group 3: all correct -> 0
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    group = torch.tensor([7, 7, 7, 7, 3, 3])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    adv = grpo_advantages(rewards, group, mask)
    expected = [[1.0, 1.0], [-1.0, 0.0], [-1.0, -1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-5) and not adv.requires_grad


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=1, max_size=24))
def test_grpo_advantages_are_zero_mean_unit_scale_per_mixed_group(samples):
    group = torch.tensor([g for g, _ in samples])
    rewards = torch.tensor([float(r) for _, r in samples])
    adv = grpo_advantages(rewards, group, torch.ones(len(samples), 1))[:, 0]
    for g in group.unique():
        a, r = adv[group == g], rewards[group == g]
        assert abs(float(a.sum())) < 1e-4
        if r.min() == r.max():
            assert torch.all(a == 0)
        else:
            assert abs(float((a ** 2).mean()) - 1) < 1e-3  # population std 1 after normalising
            assert torch.all((a > 0) == (r > 0))


def test_loss_without_teacher_has_no_teacher_clip():
    new, old = torch.tensor([[-0.5, -30.0]]), torch.tensor([[-0.5, -30.0]])
    adv, mask = torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    loss, stats = clipped_pg_loss(new, old, adv, None, mask)
    assert stats.teacher_clip_fraction == 0.0 and math.isclose(float(loss), -1.0)


def _kl_case(seed: int, b: int = 3, t: int = 4, v: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, t, v, generator=g).log_softmax(-1), (2 * torch.randn(b, t, v, generator=g)).log_softmax(-1)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_full_kl_is_nonnegative_zero_at_equality_and_the_mean_of_the_sampled_estimate(seed):
    s, t = _kl_case(seed)
    mask = torch.ones(3, 4)
    loss, mean = full_reverse_kl(s, t, mask)
    assert float(loss) >= 0 and math.isclose(float(loss), mean, rel_tol=1e-5)
    assert float(full_reverse_kl(s, s, mask)[0]) == 0
    # the sampled-token estimate log p(o) − log p_T(o), averaged over draws o ~ p, converges to it
    draws = torch.multinomial(s.exp().reshape(-1, 7), 4000, replacement=True,
                              generator=torch.Generator().manual_seed(seed))
    sampled = (s.reshape(-1, 7).gather(1, draws) - t.reshape(-1, 7).gather(1, draws)).mean()
    assert abs(float(sampled) - float(loss)) < 0.1


def test_full_kl_never_nan_with_minus_inf_logprobs():
    s, t = _kl_case(1)
    s[0, 0, :3] = -math.inf  # tokens the student cannot emit
    s[0, 0] = s[0, 0].log_softmax(-1)
    t[:, :, -1] = -math.inf  # a token the teacher cannot emit
    s = s.clone().requires_grad_(True)
    loss, _ = full_reverse_kl(s, t, torch.ones(3, 4))
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(s.grad).all()


def test_full_kl_masks_and_counts_like_the_pg_loss():
    s, t = _kl_case(2)
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    loss, _ = full_reverse_kl(s, t, mask, num_samples=6)
    kl = (s.exp() * (s - t)).sum(-1)
    want = (kl[0, :2].mean() + kl[1].mean()) / 6
    assert torch.allclose(loss, want, atol=1e-6)


def _topk(s: torch.Tensor, t: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Both models bucketed at the same candidates, then the top-k loss."""
    return topk_reverse_kl(*candidate_logprobs(s, candidates), *candidate_logprobs(t, candidates), torch.ones(3, 4))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_topk_kl_is_the_full_kl_at_k_vocab_and_a_lower_bound_below(seed, k):
    """k + 1 buckets partition the vocabulary: the bucketed KL is the full one when the candidates are every token,
    and never more than it otherwise (merging outcomes cannot raise a KL); zero at equality."""
    s, t = _kl_case(seed)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(seed))
    every = order.expand(3, 4, 7)
    full = float(full_reverse_kl(s, t, torch.ones(3, 4))[0])
    assert math.isclose(float(_topk(s, t, every)[0]), full, rel_tol=1e-5, abs_tol=1e-6)
    some = s.topk(k, dim=-1).indices  # the student's own top-k, as the trainer picks them
    bucketed = float(_topk(s, t, some)[0])
    assert -1e-6 <= bucketed <= full + 1e-5
    assert float(_topk(s, s, some)[0]) == 0


def test_topk_kl_never_nan_with_minus_inf_logprobs():
    s, t = _kl_case(3)
    s[0, 0, :3] = -math.inf
    s[0, 0] = s[0, 0].log_softmax(-1)
    t[:, :, -1] = -math.inf
    s = s.clone().requires_grad_(True)
    every = torch.arange(7).expand(3, 4, 7)  # tails −inf on both sides
    for candidates in (every, torch.tensor([0, 1, 2]).expand(3, 4, 3), torch.tensor([6, 5]).expand(3, 4, 2)):
        loss, _ = _topk(s, t, candidates)
        (grad,) = torch.autograd.grad(loss, s)
        assert math.isfinite(float(loss.detach())) and torch.isfinite(grad).all()
