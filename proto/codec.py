"""The two encodings of /v1/score: JSON for humans, msgpack with packed little-endian arrays for trainers.

Binary request:  {"items": [{"input_ids": bin<int32[n]> | [int], "response_start": int, "top_k": int,
                             "image_indices": [int], "distribution": bool,
                             "candidates": bin<int32[rows*k]> | [[int]], "candidates_k": int, "ranks": bool}],
                  "images": [bin<PNG or JPEG bytes>, ...], "float_dtype": "float32" | "float16"}
Binary response: {"api_version", "fingerprint": {...},
                  "lengths": bin<int32[items]>, "logprobs": bin<float32[sum(lengths)]>,
                  "top_k": bin<int32[items]>, "top_k_ids": bin<int32[sum(lengths*top_k)]>,
                  "top_k_logprobs": bin<float32[sum(lengths*top_k)]>,
                  "vocab": int, "distribution_items": bin<int32[items]> (1 where asked),
                  "distribution": bin<float32[sum(lengths*vocab) over those items]>,
                  "candidate_k": bin<int32[items]> (0 where not asked),
                  "candidate_logprobs": bin<float32[sum(lengths*candidate_k)]>,
                  "tail_logprobs": bin<float32[sum(lengths) over the items with candidates]>,
                  "rank_items": bin<int32[items]> (1 where asked), "ranks": bin<int32[sum(lengths) over those]>}
Arrays of all items are concatenated, so a response costs a handful of msgpack objects however many items it holds.
A request with "float_dtype": "float16" gets every float array above as float16 and "float_dtype": "float16" in the
response; the decoder returns float32 either way.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
from pydantic import BaseModel, ValidationError

from proto.body_budget import BodyBudget, check_json, unpack_msgpack
from proto.errors import ApiError, field_path
from proto.schemas import API_VERSION, INT32, JSON, MSGPACK, MSGPACK_ALIASES, Fingerprint, ScoreItem, ScoreRequest

# the binary encodings' element types, little-endian whatever the machine
FLOAT32 = np.dtype("<f4")
FLOATS = {"float32": FLOAT32, "float16": np.dtype("<f2")}  # a response's float arrays, as the request asks


@dataclass(slots=True)
class ScoredSpan:
    """Teacher scores of one item's response span; top_k arrays have shape (len(logprobs), k), the distribution
    (len(logprobs), vocab), candidate log-probs (len(logprobs), candidates k) and their tails (len(logprobs),), or
    they are None."""

    logprobs: np.ndarray
    top_k_ids: np.ndarray | None = None
    top_k_logprobs: np.ndarray | None = None
    distribution: np.ndarray | None = None
    candidate_logprobs: np.ndarray | None = None
    tail_logprobs: np.ndarray | None = None
    ranks: np.ndarray | None = None  # (len(logprobs),) int32: each token's rank, 1 = the teacher's most likely

    @property
    def candidate_k(self) -> int:
        return 0 if self.candidate_logprobs is None else int(self.candidate_logprobs.shape[1])

    @property
    def k(self) -> int:
        return 0 if self.top_k_ids is None else int(self.top_k_ids.shape[1])


def media_type(header: str | None) -> str:
    """The bare media type of a Content-Type header, lower-cased; JSON when absent."""
    if not header:
        return JSON
    return header.split(";", 1)[0].strip().lower()


def wants_msgpack(accept: str | None) -> bool:
    return bool(accept) and any(media_type(part) in MSGPACK_ALIASES for part in accept.split(","))


def validation_error(exc: ValidationError) -> ApiError:
    """A pydantic error as the API's error: 400 for unparseable JSON, else 422 naming the first bad field."""
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return ApiError(400, "malformed_body", f"body is not valid JSON: {err['msg']}")
    field = field_path(err["loc"]) or None
    return ApiError(422, "invalid_field", f"{field or 'body'}: {err['msg']}", field)


def parse_json(model: type[BaseModel], body: bytes, budget: BodyBudget | None = None):
    """`budget`: refuse (413) a body that could hold more than it, before parsing it."""
    if budget is not None:
        check_json(body, budget)
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _unpack_ids(raw: object, where: str) -> object:
    if not isinstance(raw, bytes):
        return raw
    if len(raw) % 4:
        raise ApiError(422, "invalid_field", f"{where}: packed int32 array has {len(raw)} bytes", where)
    return np.frombuffer(raw, dtype=INT32).tolist()


def _unpack_rows(raw: bytes, k: object, where: str) -> list[list[int]]:
    """A packed [rows, k] int32 array as rows (k travels beside it as `candidates_k`)."""
    ids = _unpack_ids(raw, where)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or len(ids) % k:
        raise ApiError(422, "invalid_field", f"{where}: a packed array needs candidates_k, a positive int dividing "
                       f"its {len(ids)} ids", where)
    return np.asarray(ids, dtype=np.int64).reshape(-1, k).tolist()


def decode_score_request(body: bytes, content_type: str | None, budget: BodyBudget | None = None) -> ScoreRequest:
    """`budget`: refuse (413) a body that could hold more than it, before parsing it (parsing 10^6 tiny items takes
    seconds; measuring the body takes milliseconds, proto/body_budget.py)."""
    kind = media_type(content_type)
    try:
        if kind == JSON:
            if budget is not None:
                check_json(body, budget)
            return ScoreRequest.model_validate_json(body)
        if kind not in MSGPACK_ALIASES:
            raise ApiError(415, "unsupported_media_type", f"Content-Type must be {JSON} or {MSGPACK}, got {kind!r}")
        if budget is not None:
            obj = unpack_msgpack(body, budget)
        else:
            try:
                obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
            except Exception as exc:  # msgpack raises several unrelated types for corrupt input
                raise ApiError(400, "malformed_body", f"body is not valid msgpack: {exc}") from None
        items = obj.get("items") if isinstance(obj, dict) else None
        if isinstance(items, list):
            for i, item in enumerate(items):
                if isinstance(item, dict) and "input_ids" in item:
                    item["input_ids"] = _unpack_ids(item["input_ids"], f"items[{i}].input_ids")
                if isinstance(item, dict) and isinstance(item.get("candidates"), bytes):
                    item["candidates"] = _unpack_rows(item["candidates"], item.pop("candidates_k", None),
                                                      f"items[{i}].candidates")
        images = _raw_images(obj.pop("images", []) if isinstance(obj, dict) else [])
        request = ScoreRequest.model_validate(obj)
        request.images = images
        return request
    except ValidationError as exc:
        raise validation_error(exc) from None


def _raw_images(images: object) -> list[bytes]:
    """msgpack carries images as raw bytes (JSON as base64 strings, which the model decodes)."""
    if not isinstance(images, list):
        raise ApiError(422, "invalid_field", "images: must be an array of binary PNG/JPEG data", "images")
    for i, img in enumerate(images):
        if not isinstance(img, bytes):
            raise ApiError(422, "invalid_field", f"images[{i}]: must be binary PNG/JPEG data", f"images[{i}]")
    return images


def image_bytes(images: Sequence[str | bytes], field: str = "images") -> list[bytes]:
    """Request images as bytes: JSON sends base64 strings, msgpack raw bytes. Invalid base64 is the caller's 422."""
    out = []
    for i, img in enumerate(images):
        if isinstance(img, bytes):
            out.append(img)
            continue
        try:
            out.append(base64.b64decode(img, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(422, "invalid_field", f"{field}[{i}]: not valid base64", f"{field}[{i}]") from None
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def encode_score_request(items: Sequence[ScoreItem], binary: bool, images: Sequence[bytes] = (),
                         float_dtype: str = "float32") -> bytes:
    if not binary:
        body = ScoreRequest(items=list(items), float_dtype=float_dtype).model_dump(mode="json", exclude_defaults=True)
        if images:
            body["images"] = [b64(img) for img in images]
        return json.dumps(body, separators=(",", ":")).encode()
    packed = [
        {"input_ids": it.ids_array.tobytes(), "response_start": it.response_start,
         "top_k": it.top_k, **({"image_indices": it.image_indices} if it.image_indices else {}),
         **({"distribution": True} if it.distribution else {}), **({"ranks": True} if it.ranks else {}),
         **_packed_candidates(it)}
        for it in items
    ]
    return msgpack.packb({"items": packed, **({"images": list(images)} if images else {}),
                          **({"float_dtype": float_dtype} if float_dtype != "float32" else {})})


def _packed_candidates(item: ScoreItem) -> dict:
    if item.candidates is None:
        return {}
    rows = item.candidates_array
    return {"candidates": rows.tobytes(), "candidates_k": int(rows.shape[1])}


def pack_arrays(arrays: list[np.ndarray], dtype: np.dtype) -> bytes:
    """Arrays flattened and concatenated as raw bytes of `dtype`: the binary encodings' one array form."""
    return np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype, copy=False).tobytes() if arrays else b""


def unpack_arrays(raw: bytes, sizes: np.ndarray, dtype: np.dtype) -> list[np.ndarray]:
    """pack_arrays undone: read-only views into `raw`, one per element count in `sizes` (no per-value objects);
    float16 is widened to float32 in one copy."""
    values = np.frombuffer(raw, dtype=dtype)
    if values.dtype == FLOATS["float16"]:
        values = values.astype(FLOAT32)
    return np.split(values, np.cumsum(sizes)[:-1]) if len(sizes) else []


def encode_score_response(fingerprint: Fingerprint, spans: Sequence[ScoredSpan], binary: bool,
                          float_dtype: str = "float32") -> bytes:
    if binary:
        topped = [s for s in spans if s.k]
        full = [s.distribution for s in spans if s.distribution is not None]
        floats = FLOATS[float_dtype]
        return msgpack.packb({
            "api_version": API_VERSION,
            "fingerprint": fingerprint.model_dump(),
            "lengths": np.array([len(s.logprobs) for s in spans], dtype=INT32).tobytes(),
            "logprobs": pack_arrays([s.logprobs for s in spans], floats),
            "top_k": np.array([s.k for s in spans], dtype=INT32).tobytes(),
            "top_k_ids": pack_arrays([s.top_k_ids for s in topped], INT32),
            "top_k_logprobs": pack_arrays([s.top_k_logprobs for s in topped], floats),
            "vocab": int(full[0].shape[1]) if full else 0,
            "distribution_items": np.array([s.distribution is not None for s in spans], dtype=INT32).tobytes(),
            "distribution": pack_arrays(full, floats),
            "candidate_k": np.array([s.candidate_k for s in spans], dtype=INT32).tobytes(),
            "candidate_logprobs": pack_arrays([s.candidate_logprobs for s in spans if s.candidate_k], floats),
            "tail_logprobs": pack_arrays([s.tail_logprobs for s in spans if s.candidate_k], floats),
            "rank_items": np.array([s.ranks is not None for s in spans], dtype=INT32).tobytes(),
            "ranks": pack_arrays([s.ranks for s in spans if s.ranks is not None], INT32),
            **({"float_dtype": float_dtype} if float_dtype != "float32" else {}),
        })
    results = []
    for s in spans:
        result: dict = {"logprobs": s.logprobs.tolist()}
        if s.k:
            result["top_k_ids"] = s.top_k_ids.tolist()
            result["top_k_logprobs"] = s.top_k_logprobs.tolist()
        if s.distribution is not None:
            result["distribution"] = s.distribution.tolist()
        if s.candidate_k:
            result["candidate_logprobs"] = s.candidate_logprobs.tolist()
            result["tail_logprobs"] = s.tail_logprobs.tolist()
        if s.ranks is not None:
            result["ranks"] = s.ranks.tolist()
        results.append(result)
    return json.dumps(
        {"api_version": API_VERSION, "fingerprint": fingerprint.model_dump(), "results": results},
        separators=(",", ":"),
    ).encode()


def decode_score_response(body: bytes, content_type: str | None) -> tuple[Fingerprint, list[ScoredSpan]]:
    """Client side: spans are read-only views into the response buffer (no per-value Python objects)."""
    if media_type(content_type) in MSGPACK_ALIASES:
        obj = msgpack.unpackb(body, raw=False)
        floats = FLOATS.get(obj.get("float_dtype", "float32"))
        if floats is None:
            raise ValueError(f"unknown float_dtype {obj['float_dtype']!r} in a score response")
        lengths = np.frombuffer(obj["lengths"], dtype=INT32)
        ks = np.frombuffer(obj["top_k"], dtype=INT32)
        logprobs = unpack_arrays(obj["logprobs"], lengths, floats)
        ids = unpack_arrays(obj["top_k_ids"], lengths * ks, INT32)
        lps = unpack_arrays(obj["top_k_logprobs"], lengths * ks, floats)
        spans = [
            ScoredSpan(lp, i.reshape(n, k), t.reshape(n, k)) if k else ScoredSpan(lp)
            for lp, i, t, n, k in zip(logprobs, ids, lps, lengths.tolist(), ks.tolist(), strict=True)
        ]
        vocab = int(obj.get("vocab", 0))
        asked = np.frombuffer(obj.get("distribution_items", b""), dtype=INT32).astype(bool)
        if asked.any():
            sizes = lengths[asked] * vocab
            for span, dist in zip([s for s, a in zip(spans, asked, strict=True) if a],
                                  unpack_arrays(obj["distribution"], sizes, floats), strict=True):
                span.distribution = dist.reshape(-1, vocab)
        cks = np.frombuffer(obj.get("candidate_k", b""), dtype=INT32)
        if cks.any():
            asked = cks > 0
            cands = unpack_arrays(obj["candidate_logprobs"], lengths[asked] * cks[asked], floats)
            tails = unpack_arrays(obj["tail_logprobs"], lengths[asked], floats)
            for span, k, cand, tail in zip([s for s, a in zip(spans, asked, strict=True) if a], cks[asked].tolist(),
                                           cands, tails, strict=True):
                span.candidate_logprobs, span.tail_logprobs = cand.reshape(-1, k), tail
        ranked = np.frombuffer(obj.get("rank_items", b""), dtype=INT32).astype(bool)
        if ranked.any():
            for span, ranks in zip([s for s, a in zip(spans, ranked, strict=True) if a],
                                   unpack_arrays(obj["ranks"], lengths[ranked], INT32), strict=True):
                span.ranks = ranks
        return Fingerprint.model_validate(obj["fingerprint"]), spans
    obj = json.loads(body)
    spans = []
    for r in obj["results"]:
        span = ScoredSpan(np.array(r["logprobs"], dtype=FLOAT32))
        if r.get("top_k_ids"):
            span.top_k_ids = np.array(r["top_k_ids"], dtype=INT32)
            span.top_k_logprobs = np.array(r["top_k_logprobs"], dtype=FLOAT32)
        if r.get("distribution") is not None:
            span.distribution = np.array(r["distribution"], dtype=FLOAT32).reshape(len(span.logprobs), -1)
        if r.get("candidate_logprobs") is not None:
            span.candidate_logprobs = np.array(r["candidate_logprobs"], dtype=FLOAT32).reshape(len(span.logprobs), -1)
            span.tail_logprobs = np.array(r["tail_logprobs"], dtype=FLOAT32)
        if r.get("ranks") is not None:
            span.ranks = np.array(r["ranks"], dtype=INT32)
        spans.append(span)
    return Fingerprint.model_validate(obj["fingerprint"]), spans
