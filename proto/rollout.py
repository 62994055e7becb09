"""The rollout (student sampling) API v1: request/response models and the binary response encoding.

Binary response: {"api_version", "model", "weight_version", "n",
                  "prompt_lengths": bin<int32[P]>, "prompt_ids": bin<int32[sum]>,
                  "lengths": bin<int32[P*n]>, "token_ids": bin<int32[sum]>, "logprobs": bin<float32[sum]>,
                  "finish_reasons": [str, ...]}      completions are prompt-major: completion j of prompt i is i*n+j.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator, model_validator

from proto.codec import FLOAT32, INT32, media_type, pack_arrays, unpack_arrays
from proto.schemas import API_VERSION, MSGPACK_ALIASES, TokenId

FinishReason = Literal["stop", "length"]
Number = StrictFloat | StrictInt
MIN_TEMPERATURE = 1e-5  # below it, logits / temperature overflow to inf and sampling yields NaN (vLLM: greedy)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(BaseModel):
    """Prompts as token ids or as chat conversations (rendered with the model's chat template); exactly one."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[Annotated[list[TokenId], Field(min_length=1)]] | None = Field(default=None, min_length=1)
    messages: list[Annotated[list[ChatMessage], Field(min_length=1)]] | None = Field(default=None, min_length=1)
    n: StrictInt = Field(default=1, ge=1, le=2**31 - 1)
    temperature: Number = Field(default=1.0, ge=0, le=100)
    top_p: Number = Field(default=1.0, gt=0, le=1)
    top_k: StrictInt = Field(default=0, ge=0, le=2**31 - 1, description="0 = no top-k filtering.")
    max_tokens: StrictInt = Field(ge=1, le=2**31 - 1)
    stop_token_ids: list[TokenId] = Field(default_factory=list, description="Stop tokens besides the model's EOS.")
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    images: list[str] = Field(default_factory=list, description="PNG or JPEG images (base64), each sent once "
                                                                 "however many prompts show it.")
    image_indices: list[list[Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]]] | None = Field(
        default=None, description="Per prompt, the images it shows, one per image placeholder token in it, in order.")

    @field_validator("temperature")
    @classmethod
    def _temperature_samples(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"a temperature below {MIN_TEMPERATURE:g} cannot be sampled; use 0 for greedy decoding")
        return value

    @model_validator(mode="after")
    def _one_prompt_form(self) -> GenerateRequest:
        if (self.prompts is None) == (self.messages is None):
            raise ValueError("give exactly one of prompts (token ids) or messages (chat)")
        if self.image_indices is not None and len(self.image_indices) != self.num_prompts:
            raise ValueError(f"image_indices has {len(self.image_indices)} entries; one per prompt "
                             f"({self.num_prompts}) is needed")
        return self

    @property
    def num_prompts(self) -> int:
        return len(self.prompts if self.prompts is not None else self.messages)


class Completion(BaseModel):
    token_ids: list[int]
    logprobs: list[float] = Field(description="The sampler's log-prob of each generated token (raw, no temperature).")
    finish_reason: FinishReason


class GenerateResponse(BaseModel):
    api_version: str = API_VERSION
    model: str
    weight_version: int = Field(description="Incremented by every weight update; the version that sampled these.")
    prompt_ids: list[list[int]] = Field(description="The prompts as token ids (rendered when sent as messages).")
    completions: list[list[Completion]] = Field(description="completions[i][j]: sample j of prompt i.")


class RolloutInfo(BaseModel):
    api_version: str = API_VERSION
    model: str
    revision: str = Field(description="sha256 of the config and weights the server started from.")
    tokenizer_fingerprint: str
    vocab_size: int
    max_length: int
    dtype: str
    backend: str
    weight_version: int
    eos_token_ids: list[int]
    image_token_id: int | None = Field(default=None, description="The image placeholder token; null: text only.")
    limits: dict[str, int]


class WeightsFromPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="A .safetensors file or a directory of them, under --weights-root.")


class WeightsLoaded(BaseModel):
    weight_version: int
    tensors: int
    bytes: int


class TransferInitInfo(BaseModel):
    """Where the server's workers join the trainer's weight-transfer group (vLLM's init_weight_transfer_engine)."""

    model_config = ConfigDict(extra="forbid")

    master_address: str = Field(min_length=1, max_length=253, description="Host of the trainer's rendezvous store.")
    master_port: StrictInt = Field(ge=1, le=65535)
    rank_offset: StrictInt = Field(ge=1, le=2**31 - 1, description="The first worker's rank (1: the trainer is 0).")
    world_size: StrictInt = Field(ge=2, le=2**31 - 1, description="The trainer's sender and every worker.")
    timeout_s: Number | None = Field(default=None, gt=0, le=86400, description="gloo: how long a rendezvous or a "
                                                                               "broadcast may wait.")
    packed: bool | None = Field(default=None, description="nccl: broadcast in packed buffers.")
    packed_buffer_size_bytes: StrictInt | None = Field(default=None, ge=1, le=2**40, description="nccl")
    packed_num_buffers: StrictInt | None = Field(default=None, ge=1, le=64, description="nccl")


class TransferInit(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_info: TransferInitInfo


class TransferUpdateInfo(BaseModel):
    """The tensors of one broadcast, in order, in HF checkpoint names (vLLM's dense update info)."""

    model_config = ConfigDict(extra="forbid")

    names: list[str] = Field(min_length=1)
    dtype_names: list[str] = Field(description="torch dtype names: float32, bfloat16, ...")
    shapes: list[list[Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]]]

    @model_validator(mode="after")
    def _one_entry_per_tensor(self) -> TransferUpdateInfo:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes must be as long as each other, got {len(self.names)}, "
                             f"{len(self.dtype_names)} and {len(self.shapes)}")
        return self


class TransferUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    update_info: TransferUpdateInfo


class TransferState(BaseModel):
    backend: str = Field(description="The server's weight-transfer backend (gloo, nccl).")
    updating: bool = Field(description="A round is open: between start and finish; generation waits for its end.")
    tensors: int = Field(description="Tensors received in the open round.")
    weight_version: int


@dataclass
class Sample:
    """One generated completion, as backends produce it and clients receive it."""

    token_ids: np.ndarray  # int32
    logprobs: np.ndarray  # float32
    finish_reason: str


@dataclass
class Rollouts:
    model: str
    weight_version: int
    prompt_ids: list[np.ndarray]
    samples: list[list[Sample]]


def encode_generate_response(r: Rollouts, binary: bool) -> bytes:
    flat = [s for group in r.samples for s in group]
    if binary:
        return msgpack.packb({
            "api_version": API_VERSION, "model": r.model, "weight_version": r.weight_version,
            "n": len(r.samples[0]) if r.samples else 0,
            "prompt_lengths": np.array([len(p) for p in r.prompt_ids], dtype=INT32).tobytes(),
            "prompt_ids": pack_arrays(r.prompt_ids, INT32),
            "lengths": np.array([len(s.token_ids) for s in flat], dtype=INT32).tobytes(),
            "token_ids": pack_arrays([s.token_ids for s in flat], INT32),
            "logprobs": pack_arrays([s.logprobs for s in flat], FLOAT32),
            "finish_reasons": [s.finish_reason for s in flat],
        })
    return json.dumps({
        "api_version": API_VERSION, "model": r.model, "weight_version": r.weight_version,
        "prompt_ids": [p.tolist() for p in r.prompt_ids],
        "completions": [[{"token_ids": s.token_ids.tolist(), "logprobs": s.logprobs.tolist(),
                          "finish_reason": s.finish_reason} for s in group] for group in r.samples],
    }, separators=(",", ":")).encode()


def decode_generate_response(body: bytes, content_type: str | None) -> Rollouts:
    if media_type(content_type) not in MSGPACK_ALIASES:
        obj = GenerateResponse.model_validate_json(body)
        samples = [[Sample(np.array(c.token_ids, dtype=INT32), np.array(c.logprobs, dtype=FLOAT32), c.finish_reason)
                    for c in group] for group in obj.completions]
        return Rollouts(obj.model, obj.weight_version, [np.array(p, dtype=INT32) for p in obj.prompt_ids], samples)
    obj = msgpack.unpackb(body, raw=False)
    lengths = np.frombuffer(obj["lengths"], dtype=INT32)
    prompts = unpack_arrays(obj["prompt_ids"], np.frombuffer(obj["prompt_lengths"], dtype=INT32), INT32)
    tokens = unpack_arrays(obj["token_ids"], lengths, INT32)
    logprobs = unpack_arrays(obj["logprobs"], lengths, FLOAT32)
    flat = [Sample(t, lp, f) for t, lp, f in zip(tokens, logprobs, obj["finish_reasons"], strict=True)]
    n = obj["n"]
    return Rollouts(obj["model"], obj["weight_version"], prompts, [flat[i:i + n] for i in range(0, len(flat), n)])


def response_tokens(samples: Sequence[Sequence[Sample]]) -> int:
    return sum(len(s.token_ids) for group in samples for s in group)
