"""ScoreCache against a real redis-server of its own (never the shared one on 6379), including an outage."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from proto.schemas import ScoreItem
from trainer.data import Example
from trainer.score_cache import ScoreCache


def item(ids: list[int], start: int, top_k: int = 0) -> ScoreItem:
    return ScoreItem(input_ids=ids, response_start=start, top_k=top_k)


def test_key_depends_on_fingerprint_tokens_and_options():
    base = ScoreCache.key("a" * 64, item([1, 2, 3, 4], 2))
    assert base == ScoreCache.key("a" * 64, item([1, 2, 3, 4], 2))
    variants = [
        ScoreCache.key("b" * 64, item([1, 2, 3, 4], 2)),
        ScoreCache.key("a" * 64, item([1, 2, 3, 5], 2)),
        ScoreCache.key("a" * 64, item([1, 2, 3, 4, 0], 2)),
        ScoreCache.key("a" * 64, item([1, 2, 3, 4], 3)),
        ScoreCache.key("a" * 64, item([1, 2, 3, 4], 2, top_k=1)),
    ]
    assert len({base, *variants}) == 1 + len(variants)
    assert len(base) == 64 and int(base, 16) >= 0


def test_batch_keys_are_each_items_key():
    """`keys` (the router's all-hit path) gives every item the key `key` gives it alone: mixed teachers, images on
    some items only, a distribution item and a candidate item in one batch."""
    items = [item([1, 2, 3, 4], 2), item([1, 2, 3, 4], 2), item([5, 6, 7], 1),
             ScoreItem(input_ids=[1, 2, 3], response_start=1, distribution=True),
             ScoreItem(input_ids=[1, 2, 3], response_start=1, candidates=[[4, 5]])]
    digests = ["a" * 64, "b" * 64, "a" * 64, "a" * 64, "b" * 64]
    images = [(), (b"png-1",), (b"png-1", b"png-2"), (), ()]
    want = [ScoreCache.key(d, it, im) for d, it, im in zip(digests, items, images, strict=True)]
    assert ScoreCache.keys(digests, items, images) == want
    assert len(set(want)) == len(want)
    assert ScoreCache.keys(digests, items) == [ScoreCache.key(d, it) for d, it in zip(digests, items, strict=True)]


def test_samples_sharing_a_prompt_array_key_as_if_hashed_alone():
    """`keys` hashes a prompt array once for the samples that follow it: each key is still the one `key` gives the
    item alone, also when the shared prompt comes back after another, under another teacher, or beside an item whose
    prompt is equal but another array."""
    prompt, other = np.array([7, 8, 9], "<i4"), np.array([7, 8], "<i4")
    prompt.flags.writeable = other.flags.writeable = False  # shared only read-only, so it cannot change under them
    responses = [np.array(r, "<i4") for r in ([1, 2], [1, 3], [4], [1, 2])]
    items = [ScoreItem.of_arrays(prompt, responses[0]), ScoreItem.of_arrays(prompt, responses[1]),
             ScoreItem.of_arrays(other, responses[2]), ScoreItem.of_arrays(prompt, responses[3]),
             ScoreItem.of_arrays(prompt.copy(), responses[0]), ScoreItem.of_arrays(prompt, responses[0]),
             item([7, 8, 9, 1, 2], 3, top_k=2)]
    digests = ["a" * 64] * 5 + ["b" * 64, "a" * 64]
    assert items[0].prompt_array is items[1].prompt_array is prompt
    writable, view = prompt.copy(), prompt.copy()[:]
    view.flags.writeable = False  # its base still is
    for unshared in (writable, view):
        assert ScoreItem.of_arrays(unshared, responses[0]).prompt_array is not unshared
    example = Example(record={}, domain="math", prompt_ids=[7, 8, 9])  # what the trainer's items are made from
    assert ScoreItem.of_arrays(example.prompt_array, responses[0]).prompt_array is example.prompt_array
    keys = ScoreCache.keys(digests, items)
    assert keys == [ScoreCache.key(d, it) for d, it in zip(digests, items, strict=True)]
    assert keys[0] == keys[3] == keys[4] == ScoreCache.key("a" * 64, item([7, 8, 9, 1, 2], 3))
    assert len({keys[0], keys[1], keys[2], keys[5], keys[6]}) == 5


def test_key_layout_is_the_documented_one():
    """Entries written by earlier versions (and other teams' trainers) keep matching: sha256 over the schema tag, the
    digest, top_k and response_start as int32, and the ids as int32, little-endian."""
    import hashlib

    ids = [0, 1, 151_935, 2**31 - 1]
    want = hashlib.sha256(b"uniopd-score-key/v1\0" + b"a" * 64 + b"\0" + np.array([3, 2], "<i4").tobytes()
                          + np.array(ids, "<i4").tobytes()).hexdigest()
    assert ScoreCache.key("a" * 64, item(ids, 2, top_k=3)) == want


@pytest.mark.e2e
async def test_round_trip_raw_float32_with_ttl(redis_server):
    cache = ScoreCache(redis_server.url, ttl_s=3600)
    values = {"k1": np.array([-0.5, -1.25, -3.0], dtype=np.float32), "k2": np.array([-2.0], dtype=np.float32)}
    await cache.set_many(values)
    got = await cache.get_many(["k1", "missing", "k2"], lengths=[3, 4, 1])
    assert got[1] is None
    for key, value in zip(["k1", "k2"], [got[0], got[2]], strict=True):
        assert value.dtype == np.float32 and np.array_equal(value, values[key])
    with redis_server.client() as c:
        assert c.get(f"{cache.prefix}k1") == values["k1"].astype("<f4").tobytes()  # raw bytes, no pickle/JSON
        assert 3590 < c.ttl(f"{cache.prefix}k1") <= 3600
    assert (cache.hits, cache.misses, cache.errors) == (2, 1, 0)
    await cache.aclose()


@pytest.mark.e2e
async def test_corrupt_or_wrong_length_value_is_a_miss(redis_server):
    cache = ScoreCache(redis_server.url)
    with redis_server.client() as c:
        c.set(f"{cache.prefix}odd", b"\x00" * 5)
        c.set(f"{cache.prefix}short", np.zeros(2, dtype="<f4").tobytes())
    assert await cache.get_many(["odd", "short"], lengths=[1, 3]) == [None, None]
    unchecked = await cache.get_many(["short"])
    assert unchecked[0] is not None and len(unchecked[0]) == 2
    assert cache.misses == 2 and cache.errors == 0
    await cache.aclose()


async def test_disabled_cache_misses_and_drops():
    cache = ScoreCache(None)
    await cache.set_many({"k": np.zeros(3, dtype=np.float32)})
    assert await cache.get_many(["k", "j"]) == [None, None]
    assert cache.misses == 2 and cache.errors == 0
    await cache.aclose()


@pytest.mark.e2e
async def test_outage_degrades_to_misses_and_recovers(redis_server, caplog):
    cache = ScoreCache(redis_server.url, reconnect_interval_s=0)
    value = np.array([-1.0, -2.0], dtype=np.float32)
    await cache.set_many({"k": value})
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="trainer.score_cache"):
        assert await cache.get_many(["k"]) == [None]
        await cache.set_many({"k": value})
        assert await cache.get_many(["k"]) == [None]
    assert cache.errors == 3
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1  # once per outage

    redis_server.start()  # same port, empty (no persistence)
    assert await cache.get_many(["k"]) == [None]
    assert cache.errors == 3
    await cache.set_many({"k": value})
    assert np.array_equal((await cache.get_many(["k"]))[0], value)
    await cache.aclose()


@pytest.mark.e2e
async def test_outage_does_not_contact_redis_again_within_reconnect_interval(redis_server):
    cache = ScoreCache(redis_server.url, reconnect_interval_s=3600)
    redis_server.stop()
    assert await cache.get_many(["k"]) == [None]
    await cache.set_many({"k": np.zeros(1, dtype=np.float32)})
    assert await cache.get_many(["k", "j"]) == [None, None]
    assert cache.errors == 1 and cache.misses == 3
    await cache.aclose()


async def test_in_process_cache_round_trips_and_evicts_least_recently_used():
    from trainer.score_cache import MEMORY_URL, InProcessStore

    cache = ScoreCache(MEMORY_URL)
    cache._redis = InProcessStore(max_entries=2)
    a, b, c = (np.full(2, v, dtype=np.float32) for v in (-1.0, -2.0, -3.0))
    await cache.set_many({"a": a, "b": b})
    assert np.array_equal((await cache.get_many(["a"]))[0], a)  # touching a makes b the least recently used
    await cache.set_many({"c": c})
    got = await cache.get_many(["a", "b", "c"], lengths=[2, 2, 2])
    assert got[1] is None and np.array_equal(got[0], a) and np.array_equal(got[2], c)
    assert cache.stats() == {"hits": 3, "misses": 1, "errors": 0}



def test_items_built_from_arrays_key_encode_and_check_as_validated_ones():
    """The trainer's items (ScoreItem.of_arrays: no per-token validation, arrays kept) are the same items: equal, the
    same cache key, the same bytes on the wire, the same refusal; a copy that changes the ids re-reads them."""
    from types import SimpleNamespace

    from proto.codec import encode_score_request
    from proto.validation import score_item_problem

    rng = np.random.default_rng(0)
    ids, cands = rng.integers(0, 500, 12).astype("<i4"), rng.integers(0, 500, (8, 3)).astype(np.int64)
    fast = ScoreItem.of_arrays(ids[:4], ids[4:], candidates=cands)
    slow = ScoreItem(input_ids=ids.tolist(), response_start=4, candidates=cands.tolist())
    assert fast.model_dump() == slow.model_dump() and fast.prompt_key == slow.prompt_key == ids[:4].tobytes()
    assert ScoreCache.key("a" * 64, fast) == ScoreCache.key("a" * 64, slow)
    for binary in (True, False):
        assert encode_score_request([fast], binary) == encode_score_request([slow], binary)
    small = SimpleNamespace(max_length=64, vocab_size=400, max_top_k=8, image_token_id=None)
    assert str(score_item_problem(fast, small)) == str(score_item_problem(slow, small)) != "None"
    moved = fast.model_copy(update={"input_ids": [1, *ids[1:].tolist()]})
    assert moved.ids_array[0] == 1 and ScoreCache.key("a" * 64, moved) != ScoreCache.key("a" * 64, fast)
