"""The wire encodings in isolation: round trips, and clean errors for corrupt bodies."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proto.codec import (
    ScoredSpan,
    decode_score_request,
    decode_score_response,
    encode_score_request,
    encode_score_response,
    wants_msgpack,
)
from proto.errors import ApiError, field_path
from proto.fingerprint import make_fingerprint
from proto.schemas import JSON, MSGPACK, ScoreItem

FP = make_fingerprint("m", "r" * 64, "t" * 64, "float32", "hf")

items_st = st.lists(
    st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=40).flatmap(
        lambda ids: st.builds(ScoreItem, input_ids=st.just(ids), response_start=st.integers(1, len(ids) - 1),
                              top_k=st.integers(0, 20))),
    min_size=1, max_size=8)


@given(items_st, st.booleans())
def test_request_round_trip(items, binary):
    body = encode_score_request(items, binary)
    assert decode_score_request(body, MSGPACK if binary else JSON).items == items


@st.composite
def spans_st(draw):
    spans = []
    for _ in range(draw(st.integers(1, 6))):
        n, k = draw(st.integers(1, 30)), draw(st.integers(0, 5))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        lp = -rng.exponential(size=n).astype(np.float32)
        if k:
            spans.append(ScoredSpan(lp, rng.integers(0, 1000, (n, k)).astype(np.int32),
                                    -rng.exponential(size=(n, k)).astype(np.float32)))
        else:
            spans.append(ScoredSpan(lp))
    return spans


@settings(max_examples=50)
@given(spans_st(), st.booleans())
def test_response_round_trip_is_exact(spans, binary):
    fp, got = decode_score_response(encode_score_response(FP, spans, binary), MSGPACK if binary else JSON)
    assert fp == FP
    for a, b in zip(spans, got, strict=True):
        assert a.logprobs.dtype == b.logprobs.dtype and np.array_equal(a.logprobs, b.logprobs)
        assert a.k == b.k
        if a.k:
            assert np.array_equal(a.top_k_ids, b.top_k_ids) and np.array_equal(a.top_k_logprobs, b.top_k_logprobs)


def test_binary_is_four_bytes_per_value():
    spans = [ScoredSpan(np.zeros(1000, np.float32))]
    small = encode_score_response(FP, spans, binary=True)
    assert 4000 <= len(small) < 4000 + 1000  # the payload plus a fixed header (fingerprint, keys)


def test_float16_responses_halve_the_floats_and_decode_to_float32():
    """Every float array as float16 when asked (within its rounding; -inf kept), int arrays untouched; the request
    carries the ask in both encodings."""
    rng = np.random.default_rng(0)
    lp = np.append(-rng.exponential(5, 999), -np.inf).astype(np.float32)
    span = ScoredSpan(lp, rng.integers(0, 500, (1000, 2)).astype(np.int32), np.sort(-rng.exponential(size=(1000, 2))
                      ).astype(np.float32), distribution=-rng.exponential(size=(1000, 3)).astype(np.float32),
                      candidate_logprobs=-rng.exponential(size=(1000, 2)).astype(np.float32),
                      tail_logprobs=-rng.exponential(size=1000).astype(np.float32),
                      ranks=rng.integers(1, 500, 1000).astype(np.int32))
    full, half = (encode_score_response(FP, [span], True, dtype) for dtype in ("float32", "float16"))
    saved = 2 * 1000 * (1 + 2 + 3 + 2 + 1)  # two bytes per float value, less the response's "float_dtype" entry
    assert saved - 32 <= len(full) - len(half) < saved
    _, (got,) = decode_score_response(half, MSGPACK)
    for field in ("logprobs", "top_k_logprobs", "distribution", "candidate_logprobs", "tail_logprobs"):
        want, have = getattr(span, field), getattr(got, field)
        assert have.dtype == np.float32 and have.shape == want.shape
        np.testing.assert_allclose(have, want, rtol=2**-11, err_msg=field)
        assert not np.array_equal(have, want), f"{field}: float16 was not applied"
    assert got.logprobs[-1] == -np.inf
    assert np.array_equal(got.top_k_ids, span.top_k_ids) and np.array_equal(got.ranks, span.ranks)
    for binary in (False, True):
        body = encode_score_request([ScoreItem(input_ids=[1, 2], response_start=1)], binary, float_dtype="float16")
        assert decode_score_request(body, MSGPACK if binary else JSON).float_dtype == "float16"
    with pytest.raises(ApiError) as err:
        decode_score_request(b'{"items":[{"input_ids":[1,2],"response_start":1}],"float_dtype":"bf16"}', JSON)
    assert err.value.status == 422 and err.value.field == "float_dtype"


@pytest.mark.parametrize(("body", "kind", "status"), [
    (b"\x92\x01\x02", MSGPACK, 422),  # a list, not a map
    (b"\xc1", MSGPACK, 400),  # reserved byte
    (msgpack.packb({1: 2}), MSGPACK, 400),  # non-string key
    (b"[", JSON, 400),
    (b"{}", "application/xml", 415),
])
def test_corrupt_requests(body, kind, status):
    with pytest.raises(ApiError) as exc:
        decode_score_request(body, kind)
    assert exc.value.status == status


def test_accept_negotiation():
    assert wants_msgpack("application/x-msgpack")
    assert wants_msgpack("application/json;q=0.5, application/msgpack")
    assert not wants_msgpack("*/*") and not wants_msgpack(None)


def test_field_path_drops_union_tags():
    assert field_path(("items", 3, "input_ids", 7)) == "items[3].input_ids[7]"
    assert field_path(("prompt", "Many", 1)) == "prompt[1]"
    assert field_path(("input_ids", "list[int]", 0)) == "input_ids[0]"
