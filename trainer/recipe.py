"""Uni-OPD on top of any advantage estimator (docs/method.md §3–§4): online balancing, then margin calibration.

Pure: tensors and arrays in, tensors, arrays and numbers out; the random draw comes from the caller's generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from trainer.balancing import SCOPES, online_balance
from trainer.calibration import CalibrationSpec, calibrate


@dataclass(frozen=True)
class RecipeSpec:
    """`balance_ratio` r (correct:incorrect) turns online balancing on; None leaves every sample in the loss."""

    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    balance_ratio: float | None = None
    balance_scope: str = "group"

    def __post_init__(self) -> None:
        if self.balance_ratio is not None and not self.balance_ratio >= 0:
            raise ValueError(f"balance_ratio must be >= 0 (or inf), got {self.balance_ratio!r}")
        if self.balance_scope not in SCOPES:
            raise ValueError(f"balance_scope must be one of {SCOPES}, got {self.balance_scope!r}")


@dataclass
class RecipeOutput:
    advantages: torch.Tensor  # (B, T) calibrated
    loss_mask: torch.Tensor  # (B, T): the estimator's mask, zero for samples balancing dropped or calibration masked
    metrics: dict[str, float]  # balance/* and calib/*


def uni_opd(advantages: torch.Tensor, mask: torch.Tensor, group: np.ndarray, correct: np.ndarray, spec: RecipeSpec,
            rng: np.random.Generator) -> RecipeOutput:
    """Samples dropped by balancing stay in the calibration statistics (§3: "drop" is loss mask 0); the loss ignores
    them. A sample with no verdict reads as incorrect only if the caller says so in `correct`."""
    keep = np.ones(len(group), dtype=bool)
    metrics: dict[str, float] = {}
    if spec.balance_ratio is not None:
        keep, balance = online_balance(group, correct, spec.balance_ratio, spec.balance_scope, rng)
        metrics.update({f"balance/{k}": float(v) for k, v in asdict(balance).items()})
    advantages, masked, calib = calibrate(advantages, mask, group, correct, spec.calibration)
    metrics.update({f"calib/{k}": float(v) for k, v in asdict(calib).items()})
    in_loss = torch.as_tensor(keep & ~masked, dtype=mask.dtype, device=mask.device)
    return RecipeOutput(advantages, mask * in_loss[:, None], metrics)
