"""The OPD math (docs/method.md §1, §9): per-token advantages, the clipped policy-gradient loss and the exact reverse KL
over the vocabulary. Pure tensor functions.

`grpo_advantages` is the outcome-reward-only RL baseline the experiment compares against (no teacher at all).

Shapes: (B, T) for B samples padded to T response tokens; `mask` is 1 on real, trainable tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def opd_advantages(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A_t = log π_T(o_t) − log π_old(o_t): no discount, baseline or whitening; zero where masked; no gradient."""
    return ((teacher_logprobs - old_logprobs) * mask).detach()


def grpo_advantages(rewards: torch.Tensor, group: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (R_i − mean of its group) / (std of its group + eps), the same for every token of sample i.

    std is the population std of the group; a group whose rewards are all equal gets zero advantage."""
    _, inverse = torch.unique(group, return_inverse=True)
    rewards = rewards.to(torch.float64)
    count = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inverse, rewards) / count
    var = torch.zeros_like(count).index_add_(0, inverse, (rewards - mean[inverse]) ** 2) / count
    adv = (rewards - mean[inverse]) / (var.sqrt()[inverse] + eps)
    return (adv.to(mask.dtype)[:, None] * mask).detach()


def trajectory_returns(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G(τ) = token mean of the advantages (0 for an empty or fully masked sample)."""
    return (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)


@dataclass
class LossStats:
    clip_fraction: float
    teacher_clip_fraction: float
    approx_kl: float
    full_kl: float = math.nan  # the exact reverse KL per token, where the loss has it


def clipped_pg_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    teacher_logprobs: torch.Tensor | None, mask: torch.Tensor, clip_low: float = 0.2,
                    clip_high: float = 0.28, logprob_clip: float = 10.0,
                    num_samples: int | None = None) -> tuple[torch.Tensor, LossStats]:
    """PPO-style clipped surrogate with the teacher–student log-prob clip; token mean per sample, mean over samples.

    `num_samples` is the B of the whole batch when this is one micro-batch of it, so micro-batch losses add up to
    the batch loss. Without teacher log-probs (the RL baseline) there is no teacher–student clip."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * advantages
    per_token = torch.maximum(unclipped, clipped)
    near_teacher = (torch.ones_like(per_token) if teacher_logprobs is None
                    else ((new_logprobs - teacher_logprobs).abs() < logprob_clip).to(per_token.dtype))
    per_token = per_token * near_teacher * mask
    per_sample = per_token.sum(-1) / mask.sum(-1).clamp(min=1)
    loss = per_sample.sum() / (num_samples or per_sample.shape[0])
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = LossStats(
            clip_fraction=float(((clipped > unclipped).to(mask.dtype) * mask).sum() / n),
            teacher_clip_fraction=float(((1 - near_teacher) * mask).sum() / n),
            approx_kl=float(((old_logprobs - new_logprobs) * mask).sum() / n),
        )
    return loss, stats


MIN_LOGPROB = -1e4  # below any real log-prob; keeps 0 · (−inf) out of the KL and its gradient


def full_reverse_kl(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
                    num_samples: int | None = None) -> tuple[torch.Tensor, float]:
    """Exact per-position reverse KL over the vocabulary (docs/method.md §9), as a loss: (loss, mean KL per token).

    KL_t = Σ_v p(v) (log p(v) − log p_T(v)) with p the student's distribution, differentiable through p; (B, T, V)
    log-probs in, aggregated like the PG loss (token mean per sample, mean over `num_samples`). −inf log-probs on
    either side are read as MIN_LOGPROB, so a token neither model can emit adds exactly 0 and no NaN."""
    s = student_logprobs.clamp(min=MIN_LOGPROB)
    kl = (s.exp() * (s - teacher_logprobs.clamp(min=MIN_LOGPROB))).sum(-1)
    per_sample = (kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    loss = per_sample.sum() / (num_samples or per_sample.shape[0])
    with torch.no_grad():
        mean_kl = float((kl * mask).sum() / mask.sum().clamp(min=1))
    return loss, mean_kl


def topk_reverse_kl(student_candidates: torch.Tensor, student_tail: torch.Tensor, teacher_candidates: torch.Tensor,
                    teacher_tail: torch.Tensor, mask: torch.Tensor,
                    num_samples: int | None = None) -> tuple[torch.Tensor, float]:
    """Reverse KL over k candidates and one tail bucket (the mass of every other token), as a loss: (loss, mean KL
    per token). (B, T, k) candidate log-probs and (B, T) tail log-probs of both models at the same candidates.

    The k + 1 buckets are a partition of the vocabulary, so this is the exact reverse KL of the two bucketed
    distributions: equal to full_reverse_kl when the candidates are the whole vocabulary (both tails −inf), and a
    lower bound on it otherwise. Aggregated and −inf-safe as full_reverse_kl is."""
    return full_reverse_kl(torch.cat([student_candidates, student_tail[..., None]], -1),
                           torch.cat([teacher_candidates, teacher_tail[..., None]], -1), mask, num_samples)
