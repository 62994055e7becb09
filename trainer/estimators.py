"""Advantage estimators: what turns a collated Batch into per-token advantages, and a micro-batch into its loss. The
step never asks which one it has.

A new estimator (top-k, …) is one more class here and one more entry in ESTIMATORS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from modeling.logprobs import ResponseLogprobs, candidate_logprobs
from trainer.batch import Batch
from trainer.opd import (
    LossStats,
    clipped_pg_loss,
    full_reverse_kl,
    grpo_advantages,
    opd_advantages,
    topk_reverse_kl,
)


@dataclass(frozen=True)
class LossSpec:
    """ε_low, ε_high of the clipped ratio and the teacher–student log-prob clip c (docs/method.md §1)."""

    clip_low: float = 0.2
    clip_high: float = 0.28
    logprob_clip: float = 10.0


@dataclass
class LossRows:
    """What a loss reads, per sample: (B, T) tensors, and (B, T, V) teacher distributions when asked for."""

    old: torch.Tensor
    teacher: torch.Tensor
    teacher_dist: torch.Tensor | None
    advantages: torch.Tensor  # after calibration
    offsets: torch.Tensor  # what calibration added to the estimator's advantages
    mask: torch.Tensor
    candidates: torch.Tensor | None = None  # (B, T, k) the student's top-k ids under π_old (topk signal)
    teacher_candidates: torch.Tensor | None = None  # (B, T, k) the teacher's log-probs of them
    teacher_tail: torch.Tensor | None = None  # (B, T) the teacher's log-prob of every other token
    rich: torch.Tensor | None = None  # (B,) 1 where the teacher gave the topk/full signal; None: every row
    num_samples: int = 0  # B of the whole minibatch, so that micro-batch losses add up to its loss

    def take(self, idx: np.ndarray, like: torch.Tensor, num_samples: int) -> LossRows:
        """The rows `idx` cut to the width of a micro-batch's (b, T') `like`, on its device."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx, : like.shape[1]].to(like.device)

        return LossRows(cut(self.old), cut(self.teacher), cut(self.teacher_dist), cut(self.advantages),
                        cut(self.offsets), cut(self.mask), cut(self.candidates), cut(self.teacher_candidates),
                        cut(self.teacher_tail), None if self.rich is None else self.rich[idx].to(like.device),
                        num_samples)


class AdvantageEstimator(Protocol):
    teacher_signal: str | None  # what the step asks the teachers for: None (no teacher), "sampled", "topk" or "full"

    def advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, T) advantages, (B, T) mask of the tokens that carry them)."""
        ...

    def loss(self, student: ResponseLogprobs, rows: LossRows, spec: LossSpec) -> tuple[torch.Tensor, LossStats]:
        """The micro-batch's loss, differentiable through `student`."""
        ...


class OPD:
    """Sampled-token OPD (docs/method.md §1): A_t = log π_T − log π_old. A sample the teacher did not score is masked
    out, never zero-filled."""

    teacher_signal = "sampled"

    def advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch.valid * batch.scored[:, None]
        return opd_advantages(batch.teacher, batch.old, mask), mask

    def loss(self, student: ResponseLogprobs, rows: LossRows, spec: LossSpec) -> tuple[torch.Tensor, LossStats]:
        return clipped_pg_loss(student.logprobs, rows.old, rows.advantages, rows.teacher, rows.mask, spec.clip_low,
                               spec.clip_high, spec.logprob_clip, rows.num_samples)


class FullDistributionOPD(OPD):
    """OPD with the exact reverse KL over the vocabulary at every position (docs/method.md §9) in place of the
    sampled-token estimate. The sampled-token A_t still defines the returns G that balancing and calibration read;
    what calibration adds to A rides on a PG term, so Uni-OPD works unchanged on top. Rows whose teacher pool answers
    with the sampled token only (`teachers.<domain>.teacher_signal: sampled`) keep sampled-token OPD."""

    teacher_signal = "full"

    def loss(self, student: ResponseLogprobs, rows: LossRows, spec: LossSpec) -> tuple[torch.Tensor, LossStats]:
        rich = _rich_mask(rows)
        return _kl_and_pg(*full_reverse_kl(student.distributions(), rows.teacher_dist, rich, rows.num_samples),
                          student, rows, spec)


class TopKOPD(OPD):
    """OPD with the reverse KL over the student's top-k tokens and a tail bucket (the rest of the vocabulary) at
    every position, the teacher scoring exactly those buckets: k + 1 numbers a position instead of one (sampled) or
    vocab (full). G, balancing and calibration read the sampled-token A_t, as with the full distribution."""

    teacher_signal = "topk"

    def loss(self, student: ResponseLogprobs, rows: LossRows, spec: LossSpec) -> tuple[torch.Tensor, LossStats]:
        own, own_tail = candidate_logprobs(student.distributions(), rows.candidates)
        return _kl_and_pg(*topk_reverse_kl(own, own_tail, rows.teacher_candidates, rows.teacher_tail,
                                           _rich_mask(rows), rows.num_samples), student, rows, spec)


def _rich_mask(rows: LossRows) -> torch.Tensor:
    """(B, T): the loss tokens of the rows that carry the topk/full signal."""
    return rows.mask if rows.rich is None else rows.mask * rows.rich[:, None]


def _kl_and_pg(kl: torch.Tensor, mean_kl: float, student: ResponseLogprobs, rows: LossRows,
               spec: LossSpec) -> tuple[torch.Tensor, LossStats]:
    """A KL loss (on the rich rows) plus one PG term: on the rich rows what calibration added to the advantages
    (zero when calibration is off), on the rest the whole sampled-token A_t. The teacher–student clip applies where
    the sampled token is the signal: on the rich rows the student stands in for the teacher, so it never clips."""
    logprobs = student.logprobs
    if rows.rich is None:
        advantages, teacher = rows.offsets, None
    else:
        rich = rows.rich[:, None].bool()
        advantages = torch.where(rich, rows.offsets, rows.advantages)
        teacher = torch.where(rich, logprobs.detach(), rows.teacher)
    pg, stats = clipped_pg_loss(logprobs, rows.old, advantages, teacher, rows.mask, spec.clip_low, spec.clip_high,
                                spec.logprob_clip, rows.num_samples)
    stats.full_kl = mean_kl
    return kl + pg, stats


class GRPO:
    """The outcome-reward RL baseline: group-normalised verifier reward on every token; no teacher."""

    teacher_signal = None

    def advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = torch.as_tensor(batch.correct, dtype=torch.float32)
        return grpo_advantages(rewards, torch.as_tensor(batch.group), batch.valid), batch.valid

    def loss(self, student: ResponseLogprobs, rows: LossRows, spec: LossSpec) -> tuple[torch.Tensor, LossStats]:
        return clipped_pg_loss(student.logprobs, rows.old, rows.advantages, None, rows.mask, spec.clip_low,
                               spec.clip_high, spec.logprob_clip, rows.num_samples)


# (algorithm.estimator, algorithm.teacher_signal) -> estimator
ESTIMATORS: dict[tuple[str, str], AdvantageEstimator] = {
    ("opd", "sampled"): OPD(), ("opd", "topk"): TopKOPD(), ("opd", "full"): FullDistributionOPD(),
    ("grpo", "sampled"): GRPO()}
