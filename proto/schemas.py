"""Request and response models of the teacher scoring API (v1).

These pydantic models are the JSON form of the contract and the source of the OpenAPI schema; the binary form
(proto.codec) carries the same fields with arrays packed as little-endian bytes.
"""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_serializer

API_VERSION = "v1"
JSON = "application/json"
MSGPACK = "application/x-msgpack"
MSGPACK_ALIASES = frozenset({MSGPACK, "application/msgpack", "application/vnd.msgpack"})
SCORING_MODE = "prefill-raw-logprobs"

TokenId = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]
INT32 = np.dtype("<i4")
# cached_property names: a copy rebuilds them
_PACKED = ("ids_array", "prompt_array", "response_array", "candidates_array")


class ScoreItem(BaseModel):
    """One sequence to score: the prompt followed by the student's response, exactly as the student tokenized it."""

    model_config = ConfigDict(extra="forbid")

    input_ids: list[TokenId] = Field(min_length=2, description="Prompt + response token ids.")
    response_start: StrictInt = Field(
        ge=1, le=2**31 - 1, description="Index of the first response token; 1 <= response_start < len(input_ids)."
    )
    top_k: StrictInt = Field(
        default=0, ge=0, le=2**31 - 1, description="Also return the teacher's k most likely tokens per position."
    )
    distribution: StrictBool = Field(
        default=False, description="Also return the teacher's whole log-distribution over its vocabulary at every "
                                   "response position ([R, vocab] float32), for exact KL losses; bounded per request "
                                   "by the server's max_distribution_values (R x vocab summed over items).")
    ranks: StrictBool = Field(
        default=False, description="Also return each response token's rank under the teacher (1 = its most likely "
                                   "token), also where it is outside any top-k: what OpenAI-style clients show.")
    candidates: list[list[TokenId]] | None = Field(
        default=None, description="Candidate token ids to score at every response position: R rows (one per "
                                  "position) or 1 row (shared by all positions), each of k distinct ids, the same k "
                                  "in every row. The teacher returns their log-probs and, per position, the log of "
                                  "the probability mass outside them (a tail bucket), so a loss over candidates + "
                                  "rest is exact. R x k values count against max_distribution_values.")
    image_indices: list[Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]] = Field(
        default_factory=list, description="The request images this item shows, one per image placeholder token in "
                                          "its prompt, in order. The teacher expands each placeholder into its image "
                                          "tokens and counts the response span from the end of the sequence.")

    @property
    def response_length(self) -> int:
        """R: the scored positions, one per response token."""
        return len(self.input_ids) - self.response_start

    @property
    def prompt_key(self) -> bytes:
        """The prompt's tokens, hashable: items with equal keys are samples of one prompt."""
        return self.prompt_array.tobytes()

    @cached_property
    def ids_array(self) -> np.ndarray:
        """`input_ids` as little-endian int32, built once: the cache key, the wire and the checks all read it."""
        return np.asarray(self.input_ids, dtype=INT32)

    @cached_property
    def prompt_array(self) -> np.ndarray:
        """The prompt's int32 ids. The items `of_arrays` makes from one prompt array share that array, so the cache
        key hashes the prompt once for all its samples."""
        return self.ids_array[:self.response_start]

    @cached_property
    def response_array(self) -> np.ndarray:
        """The response's int32 ids."""
        return self.ids_array[self.response_start:]

    @cached_property
    def candidates_array(self) -> np.ndarray | None:
        """`candidates` as an int32 [rows, k] array, built once (None without candidates)."""
        return None if self.candidates is None else np.asarray(self.candidates, dtype=INT32)

    @classmethod
    def of_arrays(cls, prompt: np.ndarray, response: np.ndarray, *, distribution: bool = False,
                  candidates: np.ndarray | None = None) -> ScoreItem:
        """An item from token arrays its maker produced itself (the trainer's rollouts), without pydantic's
        per-token validation (scorability is still `proto.validation.score_item_problem`'s to say), keeping the
        arrays: the key, the wire and the checks never go list -> array again. A read-only int32 `prompt` that owns
        its memory is kept as it is, not copied: a prompt's samples made from one such array share it (see
        `prompt_array`), and nothing can change it under them. `candidates` stays the (R, k) array, which reads row
        by row as the lists do and serializes as lists: R x k Python lists per item made the cyclic garbage collector
        the cost of a step's top-k items."""
        rows = None if candidates is None else np.ascontiguousarray(candidates, dtype=INT32)
        ids = np.concatenate((prompt, response), dtype=INT32)
        if prompt.dtype != INT32 or prompt.flags.writeable or not prompt.flags.owndata:
            prompt = ids[:len(prompt)]
        # every field given: pydantic would inspect image_indices' default factory on each call (~90 us)
        item = cls.model_construct(input_ids=ids.tolist(), response_start=len(prompt), top_k=0,
                                   distribution=distribution, ranks=False, image_indices=[], candidates=rows)
        item.__dict__.update(ids_array=ids, prompt_array=prompt, response_array=ids[len(prompt):])
        return item

    @field_serializer("candidates")
    def _candidates_as_lists(self, rows: list[list[int]] | np.ndarray | None) -> list[list[int]] | None:
        return rows.tolist() if isinstance(rows, np.ndarray) else rows

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> ScoreItem:
        """A copy whose arrays are rebuilt from its fields when `update` changes them."""
        copy = super().model_copy(update=update, deep=deep)
        for name in _PACKED:
            copy.__dict__.pop(name, None)
        return copy


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ScoreItem] = Field(min_length=1)
    images: list[str] = Field(
        default_factory=list, description="PNG or JPEG images, base64 in JSON (raw bytes in msgpack), each sent once "
                                          "however many items show it.")
    float_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Element type of a msgpack response's float arrays. float16 halves their bytes: "
                               "log-probs keep 11 significant bits (within 0.008 of float32 at -10, 0.016 at -20), "
                               "-inf stays -inf, values below -65504 become -inf. JSON responses are unaffected.")


class Fingerprint(BaseModel):
    """Identity of a teacher's scores: two teachers with equal digests return equal scores for equal input."""

    model: str
    revision: str = Field(description="sha256 of the model config and weights.")
    tokenizer: str = Field(description="sha256 of vocab, special tokens and chat template.")
    dtype: str
    backend: str
    scoring_mode: str = SCORING_MODE
    processor: str = Field(default="", description="sha256 of the image processor settings; empty for a text model.")
    digest: str = Field(description="sha256 over all fields above; the score cache keys on it.")


class ScoreResult(BaseModel):
    logprobs: list[float] = Field(
        description="Value j is log p(input_ids[response_start+j] | input_ids[:response_start+j])."
    )
    top_k_ids: list[list[int]] | None = Field(default=None, description="Per response position, k ids, best first.")
    top_k_logprobs: list[list[float]] | None = None
    distribution: list[list[float]] | None = Field(
        default=None, description="Per response position, log p of every vocabulary token (when asked for).")
    ranks: list[int] | None = Field(default=None, description="Per response position, the token's rank (1 = most "
                                                              "likely), when asked for.")
    candidate_logprobs: list[list[float]] | None = Field(
        default=None, description="Per response position, log p of each candidate, in the order asked (when asked).")
    tail_logprobs: list[float] | None = Field(
        default=None, description="Per response position, log of the probability of every token outside its "
                                  "candidates (-inf when they cover the vocabulary).")


class ScoreResponse(BaseModel):
    api_version: str = API_VERSION
    fingerprint: Fingerprint
    results: list[ScoreResult]


class TeacherInfo(BaseModel):
    api_version: str = API_VERSION
    model: str
    revision: str
    tokenizer_fingerprint: str
    vocab_size: int
    max_length: int = Field(description="Longest input_ids accepted.")
    max_top_k: int
    dtype: str
    backend: str
    domains: list[str]
    fingerprint: Fingerprint
    image_token_id: int | None = Field(default=None, description="The image placeholder token; null: text only.")
    candidate_scoring: str = Field(default="gather", description="How candidates are scored: 'gather' (picked from "
                                   "the forward pass's distribution; R x k values count against "
                                   "max_distribution_values) or 'full-distribution' (the engine returns the whole "
                                   "distribution and they are picked from it; R x vocab values count).")
    limits: dict[str, int] = Field(description="Request limits enforced by this server.")


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class TeamLimits(BaseModel):
    tokens_per_minute: int | None = Field(description="Response tokens scored per minute; null = unlimited.")
    max_concurrent: int | None = Field(description="Scoring requests in flight at once; null = unlimited.")
    weight: int = Field(description="Share of the scorer under contention, relative to other teams.")


class TeamUsage(BaseModel):
    """The calling team's usage since the server started (or the team was added), and its limits."""

    team: str
    limits: TeamLimits
    requests: int = Field(description="Scoring requests admitted.")
    scored_tokens: int = Field(description="Response tokens scored.")
    rejected: dict[str, int] = Field(description="Requests refused, by reason: tokens_per_minute, max_concurrent, "
                                                 "queue_full.")
    in_flight: int = Field(description="Requests admitted and not yet answered.")
    tokens_available: int | None = Field(description="Tokens that may be requested now; null = unlimited.")
