"""Advantage estimators: what turns a collated Batch into per-token advantages. The step never asks which one it has.

A new estimator (top-k, full distribution, …) is one more class here and one more name in ESTIMATORS.
"""

from __future__ import annotations

from typing import Protocol

import torch

from trainer.batch import Batch
from trainer.opd import grpo_advantages, opd_advantages


class AdvantageEstimator(Protocol):
    uses_teacher: bool  # the step calls the teachers, and the loss applies the teacher–student log-prob clip

    def advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, T) advantages, (B, T) mask of the tokens that carry them)."""
        ...


class OPD:
    """Sampled-token OPD (docs/method.md §1): A_t = log π_T − log π_old. A sample the teacher did not score is masked
    out, never zero-filled."""

    uses_teacher = True

    def advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch.valid * batch.scored[:, None]
        return opd_advantages(batch.teacher, batch.old, mask), mask


class GRPO:
    """The outcome-reward RL baseline: group-normalised verifier reward on every token; no teacher."""

    uses_teacher = False

    def advantages(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = torch.as_tensor(batch.correct, dtype=torch.float32)
        return grpo_advantages(rewards, torch.as_tensor(batch.group), batch.valid), batch.valid


ESTIMATORS: dict[str, AdvantageEstimator] = {"opd": OPD(), "grpo": GRPO()}
