"""Scoring-only compatibility with clients people already run, translated onto the same TeacherService.

- SGLang native `POST /generate` with `max_new_tokens = 0`, as slime/miles/the Uni-OPD release call their teachers:
  `meta_info.input_token_logprobs` is a list of `[logprob, token_id, null]` from `logprob_start_len` on; the entry of
  token 0 has logprob null (nothing precedes it). `logprob_start_len = -1` (SGLang's default) means the last token.
  `token_ids_logprob` (miles' top-k OPD) scores given ids at every position: one list for all positions (SGLang's
  form), or one list per scored position; `meta_info.input_token_ids_logprobs` holds per position the
  `[logprob, token_id, null]` of each id in the order asked (null for token 0, as in `input_top_logprobs`).
  `image_data` (slime, the Uni-OPD release) carries a multimodal sequence's images: base64 or `data:` URLs, one per
  image placeholder of its `input_ids` in order (uniopd's one-placeholder form); never fetched from a URL or a path.
- vLLM OpenAI-style `POST /v1/completions` with token-id prompts, `max_tokens` 0 or 1 and `prompt_logprobs` (→
  `choices[].prompt_logprobs`, entry 0 null) and/or `echo` with `logprobs` (→ legacy `choices[].logprobs`). With
  `max_tokens` 0 nothing is generated. With 1 (what vLLM clients and lm-eval send), one token is generated, always
  greedily (the temperature is not applied: the token is the one vLLM picks at temperature 0): the prompt is scored
  with a placeholder token after it, whose position's top-1 is the generated token, and the response has vLLM's
  layout — `echo` gives n + 1 entries, the last one the generated token's, and `completion_tokens` is 1. As vLLM:
  `text` is the generated text, after the prompt's with `echo`; token strings are decoded text (`token_id:N` when
  the request sets `return_tokens_as_token_ids`); legacy `top_logprobs[i]` holds the top k and the token itself
  (k + 1 entries when it is outside them; `{token: logprob}` with `logprobs: 0`); every `prompt_logprobs` entry
  has an integer `rank`, also outside the top k.
- vLLM's token-in/token-out `POST /inference/v1/generate` with `sampling_params.prompt_logprob_token_ids` (fixed ids
  to score at every prompt row from `prompt_logprob_start`; -1 pads a row and scores -inf) and/or `prompt_logprobs`:
  `prompt_token_id_logprobs` is the base64 `.npy` float32 matrix [rows, ids] vLLM returns; `max_tokens` must be 1 (one
  token is generated greedily, as on /v1/completions). Ids within a row must be distinct here (candidate scoring).
- The probes and info routes their launch scripts call: SGLang's `GET /health` (200, empty body, once the model is
  loaded) and `/health_generate` (200 once a real one-token scoring pass has gone through the scorer), `/get_model_info`
  and `/get_server_info` (`model_path` is the `--model` the server was started with, as SGLang's is), and OpenAI's
  `GET /v1/models` (the model's `id` is that path too, as `vllm serve` names it by default).
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
)

from proto.body_budget import check_json
from proto.client import share_images
from proto.codec import ScoredSpan
from proto.errors import ApiError
from proto.schemas import API_VERSION, JSON, ScoreItem, TokenId
from proto.validation import candidates_problem
from services.common.auth import Team
from services.common.http import error_responses, read_parsed, request_error
from services.common.models import load_tokenizer
from services.teacher_server.quotas import Ticket
from services.teacher_server.scorer import ScorerInfo

_PROBLEMS = (400, 401, 413, 422, 429, 503)
STARTED = int(time.time())
Sequence_ = Annotated[list[TokenId], Field(min_length=2)]
StartLen = Annotated[StrictInt, Field(ge=-1, le=2**31 - 1)]
TopK = Annotated[StrictInt, Field(ge=0, le=2**31 - 1)]


def exact(*values: Any) -> Any:
    """Literal that also matches on type: pydantic's Literal takes 0 for False and True for 1."""
    kinds = {type(v) for v in values}

    def same_type(v: Any) -> Any:
        if type(v) not in kinds:
            raise ValueError(f"Input should be {' or '.join(map(repr, values))}")
        return v

    return Annotated[Literal[values], BeforeValidator(same_type)]


def _is_list_of_lists(value: Any) -> str:
    return "Many" if isinstance(value, list) and value and isinstance(value[0], list) else "One"


def _is_list(value: Any) -> str:
    return "Many" if isinstance(value, list) else "One"


def one_or_many(tp: Any, many: Any, pick=_is_list) -> Any:
    """`tp` or a batch of them, told apart up front so a validation error names the field of the right shape."""
    return Annotated[Union[Annotated[tp, Tag("One")], Annotated[many, Tag("Many")]],  # noqa: UP007
                     Discriminator(pick)]


Sequences = one_or_many(Sequence_, Annotated[list[Sequence_], Field(min_length=1)], _is_list_of_lists)
Ids = Annotated[list[TokenId], Field(min_length=1)]
# one sequence's candidates: a list for all positions, or one per position; a batch: one such entry per sequence,
# or one list for them all (told apart from the input_ids' shape in the route)
Candidates = list[TokenId] | list[Ids] | list[list[Ids] | Ids | None]


def _lists(ids: list[int] | list[list[int]]) -> tuple[list[list[int]], bool]:
    if ids and isinstance(ids[0], list):
        return ids, True  # type: ignore[return-value]
    return [ids], False  # type: ignore[list-item]


def _per_sequence(value: Any, n: int, name: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise ApiError(400, "invalid_field", f"{name} has {len(value)} entries for {n} sequences", name)
        return value
    return [value] * n


def _token(tok: int) -> str:
    return f"token_id:{tok}"


# ---- SGLang /generate -------------------------------------------------------------------------------------------

class SGLangSamplingParams(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    max_new_tokens: exact(0) = Field(description="Must be 0: this teacher only scores.")


class SGLangGenerateRequest(BaseModel):
    """The scoring subset of SGLang's /generate; anything outside it is refused with 400."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: 0 is not False, 1 is not True

    input_ids: Sequences = Field(description="One sequence, or a batch of sequences.")
    return_logprob: one_or_many(exact(True), list[exact(True)])
    logprob_start_len: one_or_many(StartLen, list[StartLen]) = -1
    top_logprobs_num: one_or_many(TopK, list[TopK]) = 0
    token_ids_logprob: Candidates | None = None
    image_data: str | list[str] | list[str | list[str] | None] | None = Field(
        default=None, description="Images of a sequence (one per image placeholder, in order) or of each sequence of a "
                                  "batch: base64 PNG/JPEG or data: URLs.")
    sampling_params: one_or_many(SGLangSamplingParams, list[SGLangSamplingParams])
    stream: exact(False) = False
    rid: str | None = None
    return_text_in_logprobs: StrictBool = False


class SGLangMetaInfo(BaseModel):
    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: dict[str, Any]
    input_token_logprobs: list[tuple[float | None, int, None]]
    output_token_logprobs: list[Any]
    input_top_logprobs: list[list[tuple[float, int, None]] | None] | None = None
    output_top_logprobs: list[Any] | None = None
    input_token_ids_logprobs: list[list[tuple[float, int, None]] | None] | None = None
    output_token_ids_logprobs: list[Any] | None = None


class SGLangGenerateResponse(BaseModel):
    text: str
    output_ids: list[int]
    meta_info: SGLangMetaInfo


def _candidates_per_sequence(value: Any, n: int, batched: bool) -> list:
    """token_ids_logprob as one entry per sequence (None, a shared list, or a list per position)."""
    if value is None:
        return [None] * n
    if not batched or (value and isinstance(value[0], int)):
        return [value] * n  # a single sequence's entry, or one list for every sequence of a batch
    return _per_sequence(value, n, "token_ids_logprob")


def _images_per_sequence(value: Any, n: int, batched: bool) -> list[list[str]]:
    """image_data as each sequence's images: a string is one image; a batch gives one entry per sequence."""
    if value is None:
        return [[] for _ in range(n)]
    entries = _per_sequence(value, n, "image_data") if batched else [value]
    return [[] if e is None else [e] if isinstance(e, str) else e for e in entries]


def _image_bytes(data: str, field: str) -> bytes:
    """A base64 image, bare or as a data: URL; anything that names a location is refused, never fetched."""
    if data.startswith("data:"):
        head, sep, data = data.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(422, "invalid_field", f"{field}: a data URL must be base64 (data:image/png;base64,...)",
                           field)
    elif "://" in data[:16] or data.startswith(("/", "./", "~")):
        raise ApiError(422, "invalid_field", f"{field}: images are sent as base64, never fetched from a URL or path",
                       field)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_field", f"{field}: not valid base64", field) from None


def _sglang_item(ids: list[int], start: int, top: int, candidates: list | None,
                 info: ScorerInfo) -> tuple[ScoreItem, int]:
    """The ScoreItem for one sequence, and the position its entries begin at. Positions before the item's
    response_start get null logprobs: token 0 (nothing precedes it) and, in a sequence with images, everything up to
    its last image placeholder (an image token has no log-prob to give)."""
    n = len(ids)
    begin = n - 1 if start == -1 else start
    if begin >= n:
        raise ApiError(422, "invalid_field", f"logprob_start_len must be -1 or in [0, {n})", "logprob_start_len")
    image_token_id = info.image_token_id
    last_image = max((p for p, t in enumerate(ids) if t == image_token_id), default=-1) if image_token_id else -1
    start_at = max(begin, 1, last_image + 1)
    if start_at >= n:
        raise ApiError(422, "invalid_field", "input_ids: no token follows the last image placeholder", "input_ids")
    rows = None
    if candidates is not None:
        if not candidates:
            raise ApiError(422, "invalid_field", "token_ids_logprob: give at least one id", "token_ids_logprob")
        rows = candidates if isinstance(candidates[0], list) else [candidates]
        if problem := candidates_problem(rows, n - start_at, info, "token_ids_logprob"):
            raise problem
    return ScoreItem(input_ids=ids, response_start=start_at, top_k=top, candidates=rows), begin


def _entries(ids: list[list[int]], values: list[list[float]]) -> list[list]:
    """Per position, SGLang's [logprob, token_id, null] triples."""
    return [[[lp, tok, None] for tok, lp in zip(row_ids, row_lps, strict=True)]
            for row_ids, row_lps in zip(ids, values, strict=True)]


def _sglang_output(item: ScoreItem, span: ScoredSpan, begin: int, rid: str) -> dict:
    ids = item.input_ids
    positions = range(item.response_start, len(ids))
    token_lps = [[lp, ids[p], None] for p, lp in zip(positions, span.logprobs.tolist(), strict=True)]
    tops = _entries(span.top_k_ids.tolist(), span.top_k_logprobs.tolist()) if span.k else None
    chosen = None
    if span.candidate_k:
        rows = item.candidates * len(token_lps) if len(item.candidates) == 1 else item.candidates
        chosen = _entries(rows, span.candidate_logprobs.tolist())
    unscored = range(begin, item.response_start)
    token_lps[:0] = [[None, ids[p], None] for p in unscored]
    for per_position in (tops, chosen):
        if per_position is not None:
            per_position[:0] = [None] * len(unscored)
    meta = {"id": rid, "prompt_tokens": len(ids), "completion_tokens": 0, "cached_tokens": 0,
            "finish_reason": {"type": "length", "length": 0}, "input_token_logprobs": token_lps,
            "output_token_logprobs": [], "input_top_logprobs": tops, "output_top_logprobs": [] if tops else None}
    if chosen is not None:
        meta |= {"input_token_ids_logprobs": chosen, "output_token_ids_logprobs": []}
    return {"text": "", "output_ids": [], "meta_info": meta}


# ---- OpenAI-style /v1/completions (vLLM dialect) ----------------------------------------------------------------

class CompletionRequest(BaseModel):
    """The scoring subset of vLLM's OpenAI-style /v1/completions; anything outside it is refused with 400."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: Sequences = Field(description="Token ids (one list or a batch).")
    model: str | None = None
    max_tokens: exact(0, 1) = Field(description="0: nothing is generated; 1: one token, greedily.")
    echo: StrictBool = False
    logprobs: TopK | None = None
    prompt_logprobs: TopK | None = None
    n: exact(1) = 1
    stream: exact(False) = False
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    user: str | None = None
    return_tokens_as_token_ids: StrictBool = Field(
        default=False, description="Token strings as `token_id:N` instead of decoded text (vLLM's option).")


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str


class LegacyLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: str
    stop_reason: None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


def _check_completion(req: CompletionRequest) -> int:
    """Validate the scoring subset; returns the top-k to ask the scorer for."""
    if req.prompt_logprobs is None and not (req.echo and req.logprobs is not None):
        raise ApiError(400, "unsupported", "set prompt_logprobs, or echo with logprobs: this teacher only scores",
                       "prompt_logprobs")
    return max(req.prompt_logprobs or 0, req.logprobs or 0)


def _split_generated(span: ScoredSpan) -> tuple[ScoredSpan, int, float]:
    """A span scored with a placeholder after the prompt: the prompt's own span, and the greedy next token with its
    log-prob (the top-1 at the placeholder's position)."""
    prompt = ScoredSpan(span.logprobs[:-1], span.top_k_ids[:-1], span.top_k_logprobs[:-1],
                        ranks=None if span.ranks is None else span.ranks[:-1])
    return prompt, int(span.top_k_ids[-1, 0]), float(span.top_k_logprobs[-1, 0])


class TokenText:
    """Token strings as a vLLM server writes them: decoded text, or `token_id:N` when the request asks for ids."""

    def __init__(self, tokenizer: Any | None, as_ids: bool) -> None:
        if tokenizer is None and not as_ids:
            raise ApiError(400, "unsupported", "this teacher has no tokenizer to decode tokens with; send "
                           "return_tokens_as_token_ids: true", "return_tokens_as_token_ids")
        self.tokenizer, self.as_ids = tokenizer, as_ids

    def token(self, tok: int) -> str:
        return _token(tok) if self.as_ids else self.tokenizer.decode([tok])

    def text(self, ids: list[int]) -> str:
        return "".join(map(self.token, ids)) if self.tokenizer is None else self.tokenizer.decode(ids)


def _prompt_logprobs(item: ScoreItem, span: ScoredSpan, k: int, names: TokenText) -> list[dict | None]:
    ids = item.input_ids
    out: list[dict | None] = [None]
    tops = span.top_k_ids.tolist() if span.k else [[]] * len(span.logprobs)
    top_lps = span.top_k_logprobs.tolist() if span.k else [[]] * len(span.logprobs)
    for j, (lp, rank) in enumerate(zip(span.logprobs.tolist(), span.ranks.tolist(), strict=True)):
        tok = ids[j + 1]
        row = {str(t): {"logprob": v, "rank": r + 1, "decoded_token": names.token(t)}
               for r, (t, v) in enumerate(zip(tops[j][:k], top_lps[j][:k], strict=True))}
        row[str(tok)] = {"logprob": lp, "rank": rank, "decoded_token": names.token(tok)}
        out.append(row)
    return out


def _top_entries(ids: list[int], lps: list[float], tok: int, lp: float, names: TokenText) -> dict[str, float]:
    """A legacy top_logprobs entry as vLLM writes it: the top k, then the token itself (k + 1 entries when it is
    outside them)."""
    return {**{names.token(t): v for t, v in zip(ids, lps, strict=True)}, names.token(tok): lp}


def _legacy_logprobs(item: ScoreItem, span: ScoredSpan, k: int, names: TokenText) -> dict:
    tokens = [names.token(t) for t in item.input_ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    tops = span.top_k_ids[:, :k].tolist() if k else [[]] * len(span.logprobs)
    top_lps = span.top_k_logprobs[:, :k].tolist() if k else [[]] * len(span.logprobs)
    top = [None] + [_top_entries(ids, lps, tok, lp, names) for ids, lps, tok, lp in zip(
        tops, top_lps, item.input_ids[1:], span.logprobs.tolist(), strict=True)]
    return {"tokens": tokens, "token_logprobs": [None, *span.logprobs.tolist()], "top_logprobs": top,
            "text_offset": offsets}


def _with_generated(echoed: dict | None, token: int, token_lp: float, scored: ScoredSpan, k: int,
                    names: TokenText) -> dict:
    """Legacy logprobs with the generated token's entry appended (after the echoed prompt's, if echoed), as vLLM
    lays them out: its top-k at that position and itself."""
    out = echoed or {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    last = out["text_offset"][-1] + len(out["tokens"][-1]) if out["tokens"] else 0
    out["tokens"].append(names.token(token))
    out["token_logprobs"].append(token_lp)
    out["text_offset"].append(last)
    ids, lps = scored.top_k_ids[-1, :k].tolist(), scored.top_k_logprobs[-1, :k].tolist()
    out["top_logprobs"].append(_top_entries(ids, lps, token, token_lp, names))
    return out


# ---- vLLM token-in/token-out /inference/v1/generate -----------------------------------------------------------

class VLLMSamplingParams(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    max_tokens: exact(1) = Field(description="1: one token, greedily (vLLM needs at least one; this teacher scores).")
    prompt_logprobs: TopK | None = None
    prompt_logprob_token_ids: list[Annotated[list[Annotated[StrictInt, Field(ge=-1)]], Field(min_length=1)]] | None \
        = Field(default=None, description="Ids to score at each prompt row from prompt_logprob_start (-1: padding).")
    prompt_logprob_start: Annotated[StrictInt, Field(ge=0)] = 0


class VLLMGenerateRequest(BaseModel):
    """The scoring subset of vLLM's token-in/token-out generate request; anything outside it is refused with 400."""

    model_config = ConfigDict(extra="forbid", strict=True)

    token_ids: Sequence_
    sampling_params: VLLMSamplingParams
    request_id: str | None = None
    model: str | None = None
    return_token_ids: StrictBool | None = None
    stream: exact(False) = False


def _fixed_id_rows(req: VLLMGenerateRequest, max_candidates: int) -> tuple[list[list[int]], np.ndarray] | None:
    """prompt_logprob_token_ids as one candidate row per scored position 1..n (the generated token's included), and
    where padding sat: a -1 takes an id its row does not ask for, and its score is set to -inf afterwards."""
    rows, p = req.sampling_params.prompt_logprob_token_ids, req.sampling_params
    if rows is None:
        return None
    n, field = len(req.token_ids), "sampling_params.prompt_logprob_token_ids"
    if p.prompt_logprob_start >= n - 1 or len(rows) != n - 1 - p.prompt_logprob_start:
        raise ApiError(422, "invalid_field", f"{field} has {len(rows)} rows; the prompt has "
                       f"{max(n - 1 - p.prompt_logprob_start, 0)} scored rows (prompt_len - 1 - prompt_logprob_start)",
                       field)
    if len({len(r) for r in rows}) != 1 or len(rows[0]) > max_candidates:
        raise ApiError(422, "invalid_field", f"{field}: every row needs the same number of ids, at most "
                       f"{max_candidates} (this teacher's --max-top-k)", field)
    pad = np.asarray(rows) < 0
    filled = []
    for row in rows:
        real = [t for t in row if t >= 0]
        if len(set(real)) != len(real):
            raise ApiError(422, "invalid_field", f"{field}: ids within a row must be distinct here", field)
        spare = (t for t in range(len(row) + len(real)) if t not in real)
        filled.append([t if t >= 0 else next(spare) for t in row])
    before = [filled[0]] * p.prompt_logprob_start
    return before + filled + [filled[-1]], pad


COMPAT_REQUESTS = (SGLangGenerateRequest, CompletionRequest, VLLMGenerateRequest)  # their schemas, in the OpenAPI


def _json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its own (publish_schemas adds the model's schema)."""
    return {"requestBody": {"required": True, "content": {JSON: {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _parser(model: type[BaseModel], service, field: str, rows: bool) -> Callable[[bytes], Any]:
    """Parses a body as `model` once it is known to fit the teacher's body budget (proto/body_budget.py)."""
    budget = service.limits.body_budget(field, rows_per_position=rows)

    def parse(body: bytes) -> Any:
        check_json(body, budget)
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise request_error(exc.errors(include_url=False)[0]) from None

    return parse


HEALTH_PROBE = ScoreItem(input_ids=[0, 0], response_start=1)  # one scored position: the smallest real pass


def compat_router(service, caller: Callable[..., Awaitable[Team]], model_path: str) -> APIRouter:
    """`caller` is the auth dependency that names the calling team (its quotas apply here too); `model_path` is the
    model as the operator named it (`--model`)."""
    router = APIRouter(tags=["compatibility"])

    @functools.cache
    def tokenizer() -> Any | None:
        """The model's tokenizer, to write token strings as text; None where the model path has none."""
        if not Path(model_path).is_dir():
            return None
        try:
            return load_tokenizer(model_path)
        except (OSError, ValueError):
            return None

    @router.get("/health", response_class=Response, responses=error_responses(503))
    async def health() -> Response:
        service.ready()
        return Response(status_code=200)

    @router.get("/health_generate", response_class=Response, responses=error_responses(503))
    async def health_generate() -> Response:
        """A scoring pass through the batcher and the backend, outside every team's quota (a probe is no team's)."""
        service.ready()
        try:
            await service.batcher.submit([HEALTH_PROBE], "_health", 1, None)
        except Exception as exc:
            raise ApiError(503, "unhealthy", f"a one-token scoring pass failed: {type(exc).__name__}: {exc}") from None
        return Response(status_code=200)

    @router.get("/get_model_info", dependencies=[Depends(caller)], responses=error_responses(401, 503))
    async def get_model_info() -> dict:
        service.ready()
        return {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default"}

    @router.get("/get_server_info", dependencies=[Depends(caller)], responses=error_responses(401, 503))
    async def get_server_info() -> dict:
        info = service.info()
        return {"model_path": model_path, "tokenizer_path": model_path, "served_model_name": model_path,
                "context_length": info.max_length, "dtype": info.dtype, "backend": info.backend,
                "version": f"uniopd-{API_VERSION}", "domains": info.domains, "limits": info.limits}

    @router.get("/v1/models", dependencies=[Depends(caller)], responses=error_responses(401, 503))
    async def models() -> dict:
        info = service.info()
        return {"object": "list", "data": [{
            "id": model_path, "object": "model", "created": STARTED, "owned_by": "uniopd", "root": model_path,
            "parent": None, "max_model_len": info.max_length}]}

    def scoring_route(path: str, model: type[BaseModel], field: str, rows: bool, responses: dict):
        """Registers `handler(request model, ticket)` at `path`: the team's quotas are checked before the body is
        read, and the body is parsed within the teacher's budget (`field` names the client's list of items; `rows`:
        candidates may come as one row per position) and off the event loop."""
        parse = _parser(model, service, field, rows)

        def register(handler: Callable[[Any, Ticket], Awaitable[Any]]) -> Callable[[Any, Ticket], Awaitable[Any]]:
            @router.post(path, name=handler.__name__, responses=responses, openapi_extra=_json_body(model))
            async def route(request: Request, team: Team = Depends(caller)) -> Any:  # noqa: B008
                async with service.admission(team) as ticket:
                    return await handler(await read_parsed(request, parse), ticket)

            return handler

        return register

    @scoring_route("/generate", SGLangGenerateRequest, "input_ids", rows=False, responses={
        200: {"model": SGLangGenerateResponse | list[SGLangGenerateResponse]}, **error_responses(*_PROBLEMS)})
    async def generate(req: SGLangGenerateRequest, ticket: Ticket) -> Any:
        seqs, batched = _lists(req.input_ids)
        n = len(seqs)
        _per_sequence(req.return_logprob, n, "return_logprob")
        starts = _per_sequence(req.logprob_start_len, n, "logprob_start_len")
        tops = _per_sequence(req.top_logprobs_num, n, "top_logprobs_num")
        candidates = _candidates_per_sequence(req.token_ids_logprob, n, batched)
        shown = [[_image_bytes(data, f"image_data[{i}][{j}]" if batched else f"image_data[{j}]")
                  for j, data in enumerate(row)] for i, row in enumerate(_images_per_sequence(req.image_data, n,
                                                                                              batched))]
        _per_sequence(req.sampling_params, n, "sampling_params")
        images, refs = share_images(shown)
        info = service.ready().info()
        built = [_sglang_item(ids, s, t, c, info)
                 for ids, s, t, c in zip(seqs, starts, tops, candidates, strict=True)]
        items = [item.model_copy(update={"image_indices": r}) if r else item for (item, _), r in zip(built, refs,
                                                                                                      strict=True)]
        spans = await service.score(items, ticket, images)
        rid = req.rid or uuid.uuid4().hex
        outs = [_sglang_output(item, span, begin, rid) for item, (_, begin), span in zip(items, built, spans,
                                                                                            strict=True)]
        return outs if batched else outs[0]

    @scoring_route("/v1/completions", CompletionRequest, "prompt", rows=False,
                   responses={200: {"model": CompletionResponse}, **error_responses(*_PROBLEMS)})
    async def completions(req: CompletionRequest, ticket: Ticket) -> Any:
        k = _check_completion(req)
        names = TokenText(tokenizer(), req.return_tokens_as_token_ids)
        seqs, _ = _lists(req.prompt)
        generate = req.max_tokens == 1
        items = [ScoreItem(input_ids=[*s, 0] if generate else s, response_start=1, top_k=max(k, 1) if generate else k,
                           ranks=req.prompt_logprobs is not None) for s in seqs]
        spans = await service.score(items, ticket)
        choices = []
        for i, (seq, span) in enumerate(zip(seqs, spans, strict=True)):
            item = ScoreItem(input_ids=seq, response_start=1, top_k=k)
            token = None
            if generate:
                span, token, token_lp = _split_generated(span)
            logprobs = None
            if req.echo and req.logprobs is not None:
                logprobs = _legacy_logprobs(item, span, req.logprobs, names)
            if token is not None and req.logprobs is not None:
                logprobs = _with_generated(logprobs, token, token_lp, spans[i], req.logprobs, names)
            text = (names.text(seq) if req.echo else "") + ("" if token is None else names.text([token]))
            choices.append({
                "index": i, "text": text, "finish_reason": "length", "stop_reason": None, "logprobs": logprobs,
                "prompt_logprobs": _prompt_logprobs(item, span, req.prompt_logprobs or 0, names)
                if req.prompt_logprobs is not None else None,
            })
        tokens, generated = sum(len(s) for s in seqs), len(seqs) if generate else 0
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": service.info().model, "choices": choices,
                "usage": {"prompt_tokens": tokens, "completion_tokens": generated, "total_tokens": tokens + generated}}

    @scoring_route("/inference/v1/generate", VLLMGenerateRequest, "token_ids", rows=True,
                   responses=error_responses(*_PROBLEMS))
    async def vllm_generate(req: VLLMGenerateRequest, ticket: Ticket) -> Any:
        p, ids = req.sampling_params, req.token_ids
        if p.prompt_logprobs is None and p.prompt_logprob_token_ids is None:
            raise ApiError(400, "unsupported", "set prompt_logprob_token_ids or prompt_logprobs: this teacher only "
                           "scores", "sampling_params.prompt_logprob_token_ids")
        fixed = _fixed_id_rows(req, service.ready().info().max_top_k)
        k = p.prompt_logprobs or 0
        item = ScoreItem(input_ids=[*ids, 0], response_start=1, top_k=max(k, 1), ranks=p.prompt_logprobs is not None,
                         candidates=None if fixed is None else fixed[0])
        (span,) = await service.score([item], ticket)
        prompt, token, _ = _split_generated(span)
        matrix = None
        if fixed is not None:
            start = p.prompt_logprob_start
            values = span.candidate_logprobs[start: len(ids) - 1].astype(np.float32)
            values[fixed[1]] = -np.inf
            buffer = io.BytesIO()
            np.save(buffer, values, allow_pickle=False)
            matrix = base64.b64encode(buffer.getvalue()).decode("ascii")
        scored = ScoreItem(input_ids=ids, response_start=1, top_k=k)
        plp = _prompt_logprobs(scored, prompt, k, TokenText(None, as_ids=True)) if p.prompt_logprobs is not None \
            else None
        return {"request_id": req.request_id or uuid.uuid4().hex, "created": int(time.time()),
                "model": service.info().model, "output_mode": "tokens",
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1},
                "prompt_logprobs": plp, "prompt_token_id_logprobs": matrix,
                "prompt_token_ids": ids if req.return_token_ids else None,
                "choices": [{"index": 0, "finish_reason": "length", "stop_reason": None, "token_ids": [token],
                             "logprobs": None}]}

    return router
