"""A step's rollouts, and the same rollouts collated into the padded tensors the math takes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer.data import Example
from trainer.opd import trajectory_returns
from trainer.student import pad


@dataclass
class Rollout:
    """One sampled response and everything the step learns about it."""

    example: Example
    prompt_index: int
    response: np.ndarray
    sampler_logprobs: np.ndarray
    finish_reason: str
    correct: bool = False
    teacher: np.ndarray | None = None  # teacher log-probs of the response; None = not scored (masked out)
    teacher_dist: np.ndarray | None = None  # (response length, vocab) teacher log-distributions, when asked for
    candidates: np.ndarray | None = None  # (response length, k) the student's top-k ids under π_old (topk signal)
    teacher_candidates: np.ndarray | None = None  # (response length, k) teacher log-probs of those candidates
    teacher_tail: np.ndarray | None = None  # (response length,) teacher log-prob of every other token


@dataclass
class Batch:
    """B rollouts as right-padded (B, T) tensors and length-B vectors; T is the longest response."""

    old: torch.Tensor  # (B, T) log π_old of each response token, train precision
    teacher: torch.Tensor  # (B, T) teacher log-probs, 0 where unscored
    teacher_dist: torch.Tensor | None  # (B, T, V) teacher log-distributions, 0 where unscored; None if not asked
    candidates: torch.Tensor | None  # (B, T, k) int64 the student's top-k ids (topk signal), else None
    teacher_candidates: torch.Tensor | None  # (B, T, k) teacher log-probs of them, 0 where unscored
    teacher_tail: torch.Tensor | None  # (B, T) teacher log-prob of the rest, 0 where unscored
    valid: torch.Tensor  # (B, T) 1 on real response tokens
    scored: torch.Tensor  # (B,) 1 where the teacher scored the sample
    rich: torch.Tensor  # (B,) 1 where it gave a distribution or candidates, not only the sampled token's log-prob
    group: np.ndarray  # (B,) int: the prompt each sample answers
    correct: np.ndarray  # (B,) float: 1.0 correct, 0.0 incorrect (a failed verifier reads as incorrect)
    domains: list[str]


def collate(rollouts: Sequence[Rollout], old: torch.Tensor) -> Batch:
    width = old.shape[1]
    dists = [r.teacher_dist for r in rollouts]
    vocab = next((d.shape[1] for d in dists if d is not None), None)
    cands = [r.candidates for r in rollouts]
    k = next((c.shape[1] for c in cands if c is not None), None)
    lengths = torch.tensor([len(r.response) for r in rollouts])
    teacher = pad([r.teacher if r.teacher is not None else np.zeros(0, np.float32) for r in rollouts])
    return Batch(
        old=old,
        teacher=torch.nn.functional.pad(teacher, (0, width - teacher.shape[1])),
        teacher_dist=None if vocab is None else _rows(dists, width, (vocab,)),
        candidates=None if k is None else _rows(cands, width, (k,), torch.int64),
        teacher_candidates=None if k is None else _rows([r.teacher_candidates for r in rollouts], width, (k,)),
        teacher_tail=None if k is None else _rows([r.teacher_tail for r in rollouts], width, ()),
        valid=(torch.arange(width)[None, :] < lengths[:, None]).float(),
        scored=torch.tensor([r.teacher is not None for r in rollouts], dtype=torch.float32),
        rich=torch.tensor([r.teacher_dist is not None or r.teacher_candidates is not None for r in rollouts],
                          dtype=torch.float32),
        group=np.array([r.prompt_index for r in rollouts]),
        correct=np.array([1.0 if r.correct else 0.0 for r in rollouts]),
        domains=[r.example.domain for r in rollouts],
    )


def _rows(values: Sequence[np.ndarray | None], width: int, trailing: tuple[int, ...],
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-position arrays of the rollouts, (length, *trailing) each or None, right-padded with 0 (and 0 where None)
    to (B, width, *trailing)."""
    out = torch.zeros((len(values), width, *trailing), dtype=dtype)
    for i, value in enumerate(values):
        if value is not None:
            out[i, : len(value)] = torch.from_numpy(np.array(value))
    return out


def batch_metrics(batch: Batch, advantages: torch.Tensor, mask: torch.Tensor, uses_teacher: bool) -> dict[str, float]:
    """What a step logs about its rollouts: tokens, masked samples, mean student/teacher log-probs, the sampled
    reverse-KL estimate, and per domain accuracy, sample count (with the topk/full signal, where a run asks for it)
    and mean return G (of `advantages` under `mask`, over
    the samples with a token under it: a masked sample has no return, and counting it as G = 0 would flatter it)."""
    scored = float(mask.sum())
    m: dict[str, float] = {"tokens": float(batch.valid.sum()),
                           "masked_samples": float((1 - batch.scored).sum()) if uses_teacher else 0.0}
    if scored:
        m["student_logprob"] = float((batch.old * mask).sum() / scored)
    if scored and uses_teacher:
        m["teacher_logprob"] = float((batch.teacher * mask).sum() / scored)
        m["reverse_kl"] = float(((batch.old - batch.teacher) * mask).sum() / scored)
    returns = trajectory_returns(advantages, mask)
    has_return = (mask.sum(1) > 0).numpy()
    domains = np.array(batch.domains)
    for domain in sorted(set(batch.domains)):
        ids = np.flatnonzero(domains == domain)
        m[f"{domain}/accuracy"] = float(np.mean(batch.correct[ids] == 1))
        m[f"{domain}/samples"] = len(ids)
        if batch.rich.any():  # a topk/full run: how many of the domain's samples its teacher gave that signal for
            m[f"{domain}/rich_samples"] = float(batch.rich[ids].sum())
        real = ids[has_return[ids]]
        m[f"{domain}/mean_return"] = float(returns[real].mean()) if len(real) else math.nan
    return m
