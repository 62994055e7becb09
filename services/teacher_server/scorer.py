"""The scorer protocol every teacher backend implements; routes and the batcher only ever see this."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from proto.codec import ScoredSpan
from proto.schemas import ScoreItem
from services.common.models import ModelInfo

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class ScorerInfo(ModelInfo):
    max_top_k: int = 128
    # how candidates are scored: "gather" (picked from the distribution the forward pass computed anyway; a candidate
    # item costs R x k values), or "full-distribution" (the engine returns every token's log-prob at each position
    # and the candidates are picked from it; a candidate item costs R x vocab values, as a distribution item does)
    candidate_scoring: str = "gather"


class Scorer(Protocol):
    def info(self) -> ScorerInfo: ...

    def image_positions(self, size: tuple[int, int]) -> int:
        """Positions an image of this (width, height) takes once expanded (asked of a multimodal scorer only)."""
        ...

    def score(self, items: Sequence[ScoreItem], images: Sequence[Sequence[Image]] | None = None) -> list[ScoredSpan]:
        """Teacher log-probs of each item's response span; items are already validated against info().

        `images[i]` are item i's decoded images, in placeholder order (a multimodal scorer only).
        """
        ...
