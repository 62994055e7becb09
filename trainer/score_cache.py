"""Redis cache of teacher scores, keyed on the teacher fingerprint so a swapped teacher never serves stale scores.

Entries live under one namespace per trust domain (`uniopd:score:v2:<namespace>:`): a run reads and writes only its
own, and a shared Redis confines each team's user to its namespace with an ACL, so no team can write the scores
another team reads (docs: README "Score cache"). Values are raw little-endian float32 bytes (never pickle: a cache
shared between teams must not execute what it reads). The cache is an optimisation only: when Redis is down every
lookup is a miss and every store is dropped, so a training step never fails or stalls on it; redis-py reconnects on
the next command once Redis is back.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, RedisError

from proto.codec import FLOAT32
from proto.schemas import ScoreItem

log = logging.getLogger(__name__)

# Bump when the key layout or the value encoding changes: old entries then simply stop matching.
KEY_SCHEMA = b"uniopd-score-key/v1\0"
_TWO_INT32 = struct.Struct("<ii")  # compiled once: the key is on the all-hit path, ~1 us per item in all
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


MEMORY_URL = "memory://"
# v2: entries sit under a trust domain's namespace; v1 entries (one namespace for everyone) are never read again
KEY_PREFIX = "uniopd:score:v2"
DEFAULT_NAMESPACE = "default"
NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def default_namespace(url: str | None) -> str:
    """The Redis user a URL logs in as (`redis://alpha:PASSWORD@host/0` -> `alpha`), else `default`: with one ACL
    user per team, each team's runs land in their own namespace without saying so."""
    if url is None or url == MEMORY_URL:
        return DEFAULT_NAMESPACE
    user = unquote(urlsplit(url).username or "")
    if user and user != "default" and not NAMESPACE_PATTERN.fullmatch(user):
        raise ValueError(f"Redis user {user!r} cannot name a cache namespace: set cache.namespace")
    return user or DEFAULT_NAMESPACE


def key_part(fingerprint_digest: str, float_dtype: str = "float32") -> str:
    """A teacher's part of its cache keys: its fingerprint digest, and the wire's float type where that rounds the
    values (float16 answers are cached as they arrived, so they must never be served to a float32 run)."""
    return fingerprint_digest if float_dtype == "float32" else f"{fingerprint_digest}/{float_dtype}"


@functools.lru_cache(maxsize=64)
def _teacher_hash(fingerprint_digest: str) -> hashlib._Hash:
    """The key hash's state after its teacher part, shared by every key of that teacher (copied, never updated)."""
    return hashlib.sha256(KEY_SCHEMA + fingerprint_digest.encode() + b"\0")


class InProcessStore:
    """The subset of redis-py's async API the cache uses, in a bounded LRU dict: the fallback when no Redis can be
    had (e.g. the demo on a machine without redis-server). Scores then live only as long as the process."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._max = max_entries

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        out = []
        for k in keys:
            value = self._data.get(k)
            if value is not None:
                self._data.move_to_end(k)
            out.append(value)
        return out

    def pipeline(self, transaction: bool = False) -> InProcessStore._Pipeline:
        return InProcessStore._Pipeline(self)

    def _set(self, key: str, value: bytes) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    async def aclose(self) -> None:
        self._data.clear()

    class _Pipeline:
        def __init__(self, store: InProcessStore) -> None:
            self._store, self._ops = store, []

        def set(self, key: str, value: bytes, ex: int | None = None) -> None:
            self._ops.append((key, value))

        async def execute(self) -> None:
            for key, value in self._ops:
                self._store._set(key, value)


class ScoreCache:
    """Teacher response-span log-probs in Redis; `url=None` disables it (all misses, stores dropped);
    `url="memory://"` keeps them in this process (no Redis needed, nothing shared)."""

    def __init__(self, url: str | None, ttl_s: int = 7 * 86400, namespace: str | None = None, *,
                 password: str | None = None, timeout_s: float = 1.0, reconnect_interval_s: float = 2.0) -> None:
        """`namespace`: the trust domain whose entries this cache reads and writes (default: the URL's Redis user);
        `password`: the Redis user's password when it is not in the URL (kept out of config files)."""
        namespace = default_namespace(url) if namespace is None else namespace
        if not NAMESPACE_PATTERN.fullmatch(namespace):
            raise ValueError(f"cache namespace {namespace!r}: 1-64 letters, digits, '_', '.' or '-', starting with "
                             "a letter or digit")
        self.ttl_s = ttl_s
        self.namespace = namespace
        self.prefix = f"{KEY_PREFIX}:{namespace}:"
        # One immediate retry: the first command after a Redis restart fails on the stale pooled connection.
        self._redis = None if url is None else InProcessStore() if url == MEMORY_URL else Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1),
            **({"password": password} if password else {}))
        self._reconnect_interval_s = reconnect_interval_s
        self._down_since: float | None = None
        self._last_try = 0.0
        self.hits = 0
        self.misses = 0
        self.errors = 0

    @staticmethod
    def key(fingerprint_digest: str, item: ScoreItem, images: Sequence[bytes] = ()) -> str:
        """sha256 over the key schema, teacher part (`key_part`: digest, wire float type), scoring options, token
        ids (int32 LE), for items with images the images' content hashes in placeholder order, whether the item
        asks for its distribution, and its candidates (shape and ids), as hex."""
        return ScoreCache.keys([fingerprint_digest], [item], [images])[0]

    @staticmethod
    def keys(teachers: Sequence[str], items: Sequence[ScoreItem],
             images: Sequence[Sequence[bytes]] | None = None) -> list[str]:
        """`key` of each (teacher's `key_part`, item, images), in one loop: on the all-hit path of a step the
        per-call overhead was a fifth of the keys' cost. Hashing the ids as prompt then response gives the same key
        as hashing them at once."""
        pack, out = _TWO_INT32.pack, []
        hashes = {t: _teacher_hash(t) for t in set(teachers)}
        # the samples of a prompt come together: the hash state after the last prompt, and what it was made of
        after_prompt, last_prompt, last_top_k, last_digest = None, None, 0, ""
        for i, (digest, item) in enumerate(zip(teachers, items, strict=True)):
            prompt = item.prompt_array
            if prompt is not last_prompt or item.top_k != last_top_k or digest != last_digest:
                after_prompt = hashes[digest].copy()
                after_prompt.update(pack(item.top_k, item.response_start))
                after_prompt.update(prompt)  # int32 little-endian, as the response
                last_prompt, last_top_k, last_digest = prompt, item.top_k, digest
            h = after_prompt.copy()
            h.update(item.response_array)
            if images is not None:
                for image in images[i]:  # text items hash exactly as before images existed
                    h.update(b"\0image:" + hashlib.sha256(image).digest())
            if item.distribution:  # and items without a distribution as before distributions existed
                h.update(b"\0distribution")
            if item.candidates is not None:
                rows = item.candidates_array
                h.update(b"\0candidates" + pack(*rows.shape))
                h.update(rows)
            out.append(h.hexdigest())
        return out

    def _should_try(self) -> bool:
        """During an outage, contact Redis at most once per reconnect interval so a dead Redis costs no time."""
        if self._redis is None:
            return False
        if self._down_since is None:
            return True
        return time.monotonic() - self._last_try >= self._reconnect_interval_s

    def _failed(self, op: str, exc: BaseException) -> None:
        self.errors += 1
        self._last_try = time.monotonic()
        if self._down_since is None:
            self._down_since = self._last_try
            if isinstance(exc, NoPermissionError):  # not an outage: this run's Redis user may not use its namespace
                log.error("score cache: %s refused (%s): the Redis user may not use namespace %r; check "
                          "cache.namespace and the Redis ACL. Scoring without cache", op, exc, self.namespace)
            else:
                log.warning("score cache unavailable (%s failed: %r); scoring without cache until Redis is back",
                            op, exc)

    def _succeeded(self) -> None:
        if self._down_since is not None:
            log.warning("score cache back after %.1fs outage", time.monotonic() - self._down_since)
            self._down_since = None

    async def get_many(self, keys: list[str], lengths: list[int] | None = None) -> list[np.ndarray | None]:
        """One MGET; with `lengths` (expected float32 counts) a value of another size is a miss; arrays read-only.
        A value of the wrong size (corrupt, or from a different layout) is a miss, never an error."""
        out: list[np.ndarray | None] = [None] * len(keys)
        if keys and self._should_try():
            prefix = self.prefix
            try:
                raw = await self._redis.mget([prefix + k for k in keys])
            except _FAILURES as exc:
                self._failed("MGET", exc)
            else:
                self._succeeded()
                size, frombuffer = FLOAT32.itemsize, np.frombuffer
                if lengths is None:
                    out = [None if r is None or len(r) % size else frombuffer(r, FLOAT32) for r in raw]
                else:
                    out = [frombuffer(r, FLOAT32) if r is not None and len(r) == n * size else None
                           for r, n in zip(raw, lengths, strict=True)]
        found = sum(v is not None for v in out)
        self.hits += found
        self.misses += len(keys) - found
        return out

    async def set_many(self, entries: dict[str, np.ndarray]) -> None:
        """One pipeline of SET key value EX ttl; dropped silently (but counted) when Redis is down."""
        if not entries or not self._should_try():
            return
        pipe = self._redis.pipeline(transaction=False)
        for key, value in entries.items():
            pipe.set(self.prefix + key, np.asarray(value, dtype=FLOAT32).tobytes(), ex=self.ttl_s)
        try:
            await pipe.execute()
        except _FAILURES as exc:
            self._failed("SET pipeline", exc)
        else:
            self._succeeded()

    def stats(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "errors": self.errors}

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
