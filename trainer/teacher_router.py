"""Route each rollout to its domain's teacher pool: cache first, then concurrent chunks with retries and failover.

A teacher is a shared, remote, fallible service, so every call has a timeout, bounded retries with full-jitter
backoff, failover to the next healthy replica and a per-endpoint circuit breaker. A sample that cannot be scored comes
back as None, so the caller masks it out and counts it instead of training on a zero-filled score.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np

from proto.client import TeacherClient, share_images
from proto.codec import ScoredSpan
from proto.errors import ApiError
from proto.fingerprint import digest_covers_fields
from proto.schemas import ScoreItem, TeacherInfo
from proto.validation import distribution_values
from trainer.retry import RetryPolicy
from trainer.score_cache import ScoreCache, key_part

log = logging.getLogger(__name__)


class RouterError(RuntimeError):
    """A teacher pool that must not be trained against: fix the config or the teachers, then restart."""


class TeacherUnavailable(RouterError):
    pass


class TokenizerMismatch(RouterError):
    pass


class FingerprintMismatch(RouterError):
    pass


@dataclass
class Endpoint:
    url: str
    api_key: str | None = None


def fingerprint_id(digest: str) -> int:
    """A short numeric identity of a teacher for metrics: the first 6 hex digits of its digest as an int (exact in
    TensorBoard's float32; `f"{value:06x}"` gives back the prefix that the logs show)."""
    return int(digest[:6], 16)


class CircuitBreaker:
    """Closed → open after `failures` consecutive failures → half-open after `cooldown_s` (one trial call) → closed."""

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        """May a call go out now? In half-open state this claims the single trial call."""
        if self._opened_at is None:
            return True
        if self._trial_in_flight or self._clock() - self._opened_at < self.cooldown_s:
            return False
        self._trial_in_flight = True
        return True

    def record_success(self) -> None:
        self._consecutive = 0
        self._opened_at = None
        self._trial_in_flight = False

    def abandon(self) -> None:
        """A call that ended without a verdict (cancelled): free the trial slot, stay open."""
        self._trial_in_flight = False

    def record_failure(self) -> bool:
        """Returns True when this failure (re)opens the breaker."""
        self._consecutive += 1
        reopen = self._trial_in_flight or (self._opened_at is None and self._consecutive >= self.failures)
        self._trial_in_flight = False
        if reopen:
            self._opened_at = self._clock()
        return reopen


@dataclass
class EndpointStats:
    """Per-step counters of one endpoint; latencies are of successful calls only (failures are counted instead)."""

    calls: int = 0
    failures: int = 0
    retries: int = 0
    breaker_skips: int = 0
    latencies: list[float] = field(default_factory=list)

    def snapshot(self) -> dict[str, float]:
        lat = np.asarray(self.latencies, dtype=np.float64)
        p50, p99 = (np.percentile(lat, [50, 99]).tolist() if lat.size else (0.0, 0.0))
        return {"calls": self.calls, "failures": self.failures, "retries": self.retries,
                "breaker_skips": self.breaker_skips, "latency_p50_s": p50, "latency_p99_s": p99}


class _Replica:
    def __init__(self, endpoint: Endpoint, timeout_s: float, breaker: CircuitBreaker,
                 transport: httpx.AsyncBaseTransport | None, float_dtype: str) -> None:
        self.url = endpoint.url
        self.api_key = endpoint.api_key
        self.client = TeacherClient(endpoint.url, endpoint.api_key, binary=True, timeout=timeout_s,
                                    transport=transport, float_dtype=float_dtype)
        self.breaker = breaker
        self.stats = EndpointStats()


class _Pool:
    """The replicas of one domain, the fingerprint digest (and info) they agreed on at handshake, and since when its
    calls have been failing (the retry budget counts from there, so a teacher down for good costs one step the
    budget, not every step)."""

    def __init__(self, domain: str, replicas: list[_Replica]) -> None:
        self.domain = domain
        self.replicas = replicas
        self.digest: str | None = None
        self.info: TeacherInfo | None = None
        self.failing_since: float | None = None  # time.monotonic() of the first failure since the last success
        self._cursor = 0

    def next_start(self) -> int:
        """Round-robin: each chunk starts at the replica after the previous chunk's."""
        self._cursor += 1
        return self._cursor - 1

    def pick(self, start: int) -> tuple[int, _Replica] | None:
        """The first replica from `start` (cyclically) whose breaker lets a call through; None if all are open."""
        n = len(self.replicas)
        for offset in range(n):
            index = (start + offset) % n
            replica = self.replicas[index]
            if replica.breaker.allow():
                return index, replica
            replica.stats.breaker_skips += 1
        return None


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after_s: float = 0.0) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _Fatal(Exception):
    """A request the teacher rejected as invalid (4xx other than 429): retrying cannot help."""


def _retry_after(exc: ApiError) -> float:
    try:
        return float(exc.headers.get("retry-after", 0))
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class _Caps:
    """What one request may hold: items, distinct images and distribution values (0: no cap)."""

    items: int
    images: int
    values: int


@dataclass
class _Chunk:
    """One request being filled: its items, their distinct images, their distribution values."""

    items: list[int] = field(default_factory=list)
    images: set[bytes] = field(default_factory=set)
    values: int = 0

    def fits(self, n: int, images: set[bytes], values: int, caps: _Caps) -> bool:
        return (len(self.items) + n <= caps.items and (not caps.images or len(self.images | images) <= caps.images)
                and (not caps.values or self.values + values <= caps.values))

    def add(self, i: int, images: set[bytes], values: int) -> None:
        self.items.append(i)
        self.images |= images
        self.values += values


@dataclass
class _DomainStats:
    scored: int = 0
    masked: int = 0
    cached: int = 0


class TeacherRouter:
    """Scores (domain, item) requests on that domain's teacher pool, through the score cache.

    `transport`: what every teacher client sends its requests through instead of the network (tests inject an
    httpx.MockTransport); None is the network."""

    def __init__(self, pools: dict[str, list[Endpoint]], cache: ScoreCache | None = None, *, timeout_s: float = 60.0,
                 retries: int = 5, backoff_s: float = 0.5, max_items_per_request: int = 64,
                 breaker_failures: int = 3, breaker_cooldown_s: float = 10.0, backoff_cap_s: float = 10.0,
                 retry_budget_s: float = 0.0, transport: httpx.AsyncBaseTransport | None = None,
                 float_dtype: str = "float32") -> None:
        if not pools or any(not endpoints for endpoints in pools.values()):
            raise ValueError("every domain needs at least one teacher endpoint")
        self._timeout_s = timeout_s
        self._transport = transport
        self._float_dtype = float_dtype
        self._breaker = (breaker_failures, breaker_cooldown_s)
        # One replica (client, breaker, stats) per URL, shared by the domains a teacher serves.
        self._replicas: dict[str, _Replica] = {}
        for ep in (ep for endpoints in pools.values() for ep in endpoints):
            if ep.url not in self._replicas:
                self._replicas[ep.url] = self._new_replica(ep)
        self._pools = {domain: _Pool(domain, [self._replicas[ep.url] for ep in endpoints])
                       for domain, endpoints in pools.items()}
        self.cache = cache
        self.retry = RetryPolicy(retries, backoff_s, backoff_cap_s, retry_budget_s)
        self.max_items_per_request = max_items_per_request
        self._domain_stats: dict[str, _DomainStats] = defaultdict(_DomainStats)
        self._cache_base = self._cache_counts()
        self._retired_bytes = {"bytes_sent": 0, "bytes_received": 0}  # of replicas a swap closed
        self._wire_base = self._wire_bytes()

    # --- start-up -------------------------------------------------------------------------------------------------

    def _new_replica(self, endpoint: Endpoint) -> _Replica:
        return _Replica(endpoint, self._timeout_s, CircuitBreaker(*self._breaker), self._transport, self._float_dtype)

    async def handshake(self, student_tokenizer_fingerprint: str, allow_tokenizer_mismatch: bool = False,
                        expected: dict[str, str | None] | None = None) -> dict[str, TeacherInfo]:
        """GET /v1/info on every endpoint; refuse dead endpoints, replicas that disagree, a foreign tokenizer, and a
        fingerprint other than the `expected` digest (or digest prefix) of a domain."""
        replicas = list(self._replicas.values())
        infos = dict(zip(self._replicas, await asyncio.gather(*(self._info(r) for r in replicas)), strict=True))
        out = {}
        for domain, pool in self._pools.items():
            info = self._verify(pool, {r.url: infos[r.url] for r in pool.replicas}, student_tokenizer_fingerprint,
                                allow_tokenizer_mismatch, (expected or {}).get(domain))
            pool.digest, pool.info = info.fingerprint.digest, info
            out[domain] = info
        return out

    async def probe(self, domain: str, endpoints: list[Endpoint], student_tokenizer_fingerprint: str,
                    allow_tokenizer_mismatch: bool = False, expected: str | None = None) -> TeacherInfo:
        """The handshake of a candidate pool for `domain`, leaving the live pools alone: a swap checks first."""
        if not endpoints:
            raise ValueError(f"domain {domain!r}: a teacher pool needs at least one endpoint")
        replicas = [self._new_replica(ep) for ep in endpoints]
        try:
            infos = await asyncio.gather(*(self._info(r) for r in replicas))
        finally:
            await asyncio.gather(*(r.client.aclose() for r in replicas))
        return self._verify(_Pool(domain, replicas), dict(zip([r.url for r in replicas], infos, strict=True)),
                            student_tokenizer_fingerprint, allow_tokenizer_mismatch, expected)

    def _verify(self, pool: _Pool, infos: dict[str, TeacherInfo], student: str, allow_tokenizer_mismatch: bool,
                expected: str | None) -> TeacherInfo:
        info = self._check_pool(pool, infos)
        self._check_tokenizer(pool.domain, info, student, allow_tokenizer_mismatch)
        self._check_expected(pool.domain, info, expected)
        return info

    async def replace_pool(self, domain: str, endpoints: list[Endpoint], info: TeacherInfo) -> None:
        """Route `domain` to `endpoints` from now on, cache keys under `info`'s fingerprint (from probe()).

        Call between steps. A URL another domain still uses keeps its replica (client, breaker); replicas no domain
        uses any more are closed."""
        if domain not in self._pools:
            raise ValueError(f"no teacher pool for domain {domain!r} (pools: {sorted(self._pools)})")
        if not endpoints:
            raise ValueError(f"domain {domain!r}: a teacher pool needs at least one endpoint")
        before = list(self._replicas.values())
        pool = _Pool(domain, [self._replica_for(domain, ep) for ep in endpoints])
        pool.digest, pool.info = info.fingerprint.digest, info
        self._pools[domain] = pool
        live = [r for p in self._pools.values() for r in p.replicas]
        self._replicas = {r.url: r for r in live}
        retired = [r for r in before if all(r is not x for x in live)]
        for r in retired:  # their bytes still count in the step's wire totals
            self._retired_bytes["bytes_sent"] += r.client.bytes_sent
            self._retired_bytes["bytes_received"] += r.client.bytes_received
        await asyncio.gather(*(r.client.aclose() for r in retired))

    def _replica_for(self, domain: str, endpoint: Endpoint) -> _Replica:
        """The live replica of this URL when another domain shares it or its key is unchanged, else a new one."""
        existing = self._replicas.get(endpoint.url)
        if existing is None:
            return self._new_replica(endpoint)
        shared = any(existing in p.replicas for d, p in self._pools.items() if d != domain)
        return existing if shared or existing.api_key == endpoint.api_key else self._new_replica(endpoint)

    def info(self, domain: str) -> TeacherInfo:
        """What the domain's current teacher reported at its handshake (max_length, fingerprint, ...)."""
        info = self._pools[domain].info
        if info is None:
            raise RuntimeError("call handshake() first")
        return info

    def urls(self, domain: str) -> list[str]:
        return [r.url for r in self._pools[domain].replicas]

    @staticmethod
    async def _info(replica: _Replica) -> TeacherInfo:
        try:
            return await replica.client.info()
        except (httpx.HTTPError, ApiError) as exc:
            raise TeacherUnavailable(f"teacher {replica.url} is unreachable at start-up: {exc!r}") from exc

    @staticmethod
    def _check_pool(pool: _Pool, infos: dict[str, TeacherInfo]) -> TeacherInfo:
        for url, info in infos.items():
            fp = info.fingerprint
            if not digest_covers_fields(fp) or (fp.dtype, fp.backend) != (info.dtype, info.backend):
                raise FingerprintMismatch(f"domain {pool.domain!r}: teacher {url} reports fingerprint digest "
                                          f"{fp.digest[:12]}, which is not the digest of the fields it reports "
                                          f"(dtype {fp.dtype!r} / {info.dtype!r}, backend {fp.backend!r} / "
                                          f"{info.backend!r}): its scores cannot be keyed safely")
        digests = {url: info.fingerprint.digest for url, info in infos.items()}
        if len(set(digests.values())) > 1:
            listing = ", ".join(f"{url} -> {d[:12]}" for url, d in digests.items())
            raise FingerprintMismatch(f"domain {pool.domain!r}: replicas serve different teachers ({listing})")
        info = next(iter(infos.values()))
        if info.domains and pool.domain not in info.domains:
            log.warning("domain %r is routed to teachers that declare domains %s", pool.domain, info.domains)
        return info

    @staticmethod
    def _check_expected(domain: str, info: TeacherInfo, expected: str | None) -> None:
        digest = info.fingerprint.digest
        if expected is not None and not digest.startswith(expected):
            raise FingerprintMismatch(f"domain {domain!r}: teacher {info.model!r} reports fingerprint {digest}, the "
                                      f"config expects {expected}: not the teacher this run was told to use")

    @staticmethod
    def _check_tokenizer(domain: str, info: TeacherInfo, student: str, allow: bool) -> None:
        if info.tokenizer_fingerprint == student:
            return
        message = (f"domain {domain!r}: teacher tokenizer {info.tokenizer_fingerprint} differs from the student's "
                   f"{student}; token ids would mean different text to the teacher")
        if not allow:
            raise TokenizerMismatch(message)
        log.warning("TOKENIZER MISMATCH (allowed by allow_tokenizer_mismatch): %s", message)

    # --- scoring --------------------------------------------------------------------------------------------------

    async def score(self, requests: list[tuple[str, ScoreItem]],
                    images: Sequence[Sequence[bytes]] | None = None) -> list[np.ndarray | None]:
        """Response-span teacher log-probs per request (read-only float32), or None where no replica could score it.

        `images[i]`: request i's PNG/JPEG bytes, one per image placeholder in its prompt; the router sets the items'
        `image_indices`, sends each distinct image once per HTTP request, and keys the cache on their hashes.
        """
        return [None if s is None else s.logprobs for s in await self.score_spans(requests, images)]

    async def score_spans(self, requests: list[tuple[str, ScoreItem]],
                          images: Sequence[Sequence[bytes]] | None = None) -> list[ScoredSpan | None]:
        """As `score`, with each item's full distribution too where the item asks for one."""
        digests, sizes = self._checked(requests)
        results: list[ScoredSpan | None] = [None] * len(requests)
        keys = ScoreCache.keys(digests, [item for _, item in requests], images)
        images = images or [()] * len(requests)
        if self.cache is not None and requests:
            # get_many checked each value's size, so an item with neither candidates nor a distribution holds its span
            results = [None if v is None else ScoredSpan(v) if item.candidates is None and not item.distribution
                       else _from_cache(v, item)
                       for v, (_, item) in zip(await self.cache.get_many(keys, sizes), requests, strict=True)]
        for domain, n in self._answered(requests, results).items():
            self._domain_stats[domain].cached += n
        chunks = self._chunks(requests, [i for i, r in enumerate(results) if r is None], images)
        spans = await asyncio.gather(*(self._score_chunk(self._pools[d], *_with_images(requests, images, idx))
                                       for d, idx in chunks))
        fresh = {}
        for (domain, idx), chunk_spans in zip(chunks, spans, strict=True):
            if chunk_spans is None:
                self._domain_stats[domain].masked += len(idx)
                log.warning("domain %r: %d samples could not be scored and are masked out", domain, len(idx))
                continue
            for i, span in zip(idx, chunk_spans, strict=True):
                results[i] = span
                fresh[keys[i]] = _to_cache(span)
        for domain, n in self._answered(requests, results).items():
            self._domain_stats[domain].scored += n
        if self.cache is not None and fresh:
            await self.cache.set_many(fresh)
        return results

    @staticmethod
    def _answered(requests: list[tuple[str, ScoreItem]], results: list[ScoredSpan | None]) -> Counter[str]:
        """Per domain, how many requests have a result."""
        return Counter(d for (d, _), r in zip(requests, results, strict=True) if r is not None)

    def _checked(self, requests: list[tuple[str, ScoreItem]]) -> tuple[list[str], list[int]]:
        """Each request's teacher part of its cache key (fingerprint digest, wire float type) and the float32 values
        its cached entry must hold: the span, R x vocab more for a distribution item, and R x (k + 1) more for a
        candidate item (the candidates' log-probs and the tail). One pass, which also refuses what the router cannot
        answer."""
        parts = {d: key_part(p.digest, self._float_dtype) for d, p in self._pools.items() if p.digest is not None}
        digests, sizes = [], []
        for domain, item in requests:
            pool = self._pools.get(domain)
            if pool is None:
                raise ValueError(f"no teacher pool for domain {domain!r} (pools: {sorted(self._pools)})")
            if pool.digest is None:
                raise RuntimeError("call handshake() before score(): the cache key needs each pool's fingerprint")
            if item.top_k or item.ranks:
                raise ValueError("the router returns response log-probs (and distributions, candidates) only; top_k "
                                 "must be 0 and ranks false")
            extra = pool.info.vocab_size if item.distribution else 0
            if item.candidates is not None and (k := _candidate_k(item)):
                extra += k + 1
            digests.append(parts[domain])
            sizes.append(item.response_length * (1 + extra))
        return digests, sizes

    def _chunks(self, requests: list[tuple[str, ScoreItem]], misses: list[int],
                images: Sequence[Sequence[bytes]]) -> list[tuple[str, list[int]]]:
        """Misses grouped per domain, cut into requests within max_items_per_request and the teacher's published
        max_images and max_distribution_values. A prompt's samples go in one request when they fit in one
        (affinity: the teacher then computes their shared prompt once)."""
        by_domain: dict[str, dict[tuple[int, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
        for i in misses:
            domain, item = requests[i]
            by_domain[domain][item.prompt_key].append(i)
        chunks = []
        for domain, groups in by_domain.items():
            info = self._pools[domain].info
            limits = info.limits if info else {}
            caps = _Caps(self.max_items_per_request, limits.get("max_images", 0),
                         limits.get("max_distribution_values", 0))
            chunk = _Chunk()
            for group in groups.values():
                need = [(i, set(images[i]), distribution_values(requests[i][1], info.vocab_size,
                                                                info.candidate_scoring) if info else 0)
                        for i in group]
                together = (len(group), set().union(*(shown for _, shown, _ in need)), sum(v for *_, v in need))
                if chunk.items and not chunk.fits(*together, caps) and _Chunk().fits(*together, caps):
                    chunks.append((domain, chunk.items))
                    chunk = _Chunk()
                for i, shown, values in need:
                    if chunk.items and not chunk.fits(1, shown, values, caps):
                        chunks.append((domain, chunk.items))
                        chunk = _Chunk()
                    chunk.add(i, shown, values)
            if chunk.items:
                chunks.append((domain, chunk.items))
        return chunks

    async def _score_chunk(self, pool: _Pool, items: list[ScoreItem], images: list[bytes]) -> list[ScoredSpan] | None:
        """One chunk, each retry on the next healthy replica, as `self.retry` allows (its budget counts from the
        pool's first failure); None when it was not scored."""
        start = pool.next_start()
        for attempt in itertools.count(1):
            wait = 0.0  # a 429's Retry-After
            picked = pool.pick(start)
            if picked is None:
                error = "every replica's circuit breaker is open"
            else:
                index, replica = picked
                start = index + 1
                try:
                    spans = await self._attempt(pool, replica, items, images, is_retry=attempt > 1)
                except _Retryable as exc:
                    error, wait = f"{replica.url}: {exc}", min(exc.retry_after_s, self.retry.cap_s)
                except _Fatal:  # the teacher answered: up, but refusing this chunk
                    pool.failing_since = None
                    return None
                else:
                    pool.failing_since = None
                    return spans
            now = time.monotonic()
            pool.failing_since = now if pool.failing_since is None else pool.failing_since
            failing_s = now - pool.failing_since
            delay = self.retry.wait(attempt, failing_s, random.random())
            if delay is None:
                log.warning("domain %r: %d items not scored after %d attempts, its teachers failing for %.1f s "
                            "(retry budget %g s; last: %s)", pool.domain, len(items), attempt, failing_s,
                            self.retry.budget_s, error)
                return None
            delay = max(wait, delay)
            log.warning("domain %r: %d items failed (attempt %d, its teachers failing for %.1f s): %s; retrying in "
                        "%.1f s", pool.domain, len(items), attempt, failing_s, error, delay)
            await asyncio.sleep(delay)

    async def _attempt(self, pool: _Pool, replica: _Replica, items: list[ScoreItem], images: list[bytes],
                       is_retry: bool) -> list[ScoredSpan]:
        """One HTTP call; raises _Retryable (endpoint's fault: counted, feeds the breaker) or _Fatal (our fault)."""
        replica.stats.calls += 1
        replica.stats.retries += is_retry
        t0 = time.perf_counter()
        try:
            fingerprint, spans = await replica.client.score(items, images)
            if fingerprint.digest != pool.digest:
                raise _Retryable(f"fingerprint changed since handshake: {pool.digest} -> {fingerprint.digest}")
            expected = [it.response_length for it in items]
            if [len(s.logprobs) for s in spans] != expected:
                raise _Retryable("response span lengths do not match the request")
            if any(it.distribution and (s.distribution is None or s.distribution.shape != (n, pool.info.vocab_size))
                   for it, s, n in zip(items, spans, expected, strict=True)):
                raise _Retryable("a distribution is missing or has the wrong shape")
            if any(s.candidate_k != _candidate_k(it) or (s.candidate_k and s.tail_logprobs.shape != (n,))
                   for it, s, n in zip(items, spans, expected, strict=True)):
                raise _Retryable("candidate log-probs are missing or have the wrong shape")
        except ApiError as exc:
            if exc.status == 429 or exc.status >= 500:
                self._failure(pool, replica, f"HTTP {exc.status} {exc.code}: {exc.message}")
                raise _Retryable(exc.message, _retry_after(exc)) from exc
            replica.breaker.record_success()
            log.error("teacher %s rejected a request (HTTP %d %s, field %s): %s; masking %d samples",
                      replica.url, exc.status, exc.code, exc.field, exc.message, len(items))
            raise _Fatal(exc.message) from exc
        except _Retryable as exc:
            self._failure(pool, replica, str(exc), level=logging.ERROR)
            raise
        except (httpx.HTTPError, ValueError, KeyError) as exc:  # transport errors; undecodable response bodies
            self._failure(pool, replica, repr(exc))
            raise _Retryable(repr(exc)) from exc
        except asyncio.CancelledError:
            replica.breaker.abandon()
            raise
        replica.breaker.record_success()
        replica.stats.latencies.append(time.perf_counter() - t0)
        return spans

    @staticmethod
    def _failure(pool: _Pool, replica: _Replica, reason: str, level: int = logging.DEBUG) -> None:
        replica.stats.failures += 1
        log.log(level, "teacher %s (domain %r) failed: %s", replica.url, pool.domain, reason)
        if replica.breaker.record_failure():
            log.warning("circuit breaker open for teacher %s (domain %r) for %.1fs after: %s",
                        replica.url, pool.domain, replica.breaker.cooldown_s, reason)

    # --- observability --------------------------------------------------------------------------------------------

    def _wire_bytes(self) -> dict[str, float]:
        """Scoring request and response bodies over every replica, closed ones included, cumulative."""
        replicas = self._replicas.values()
        return {"bytes_sent": self._retired_bytes["bytes_sent"] + sum(r.client.bytes_sent for r in replicas),
                "bytes_received": self._retired_bytes["bytes_received"] + sum(r.client.bytes_received
                                                                              for r in replicas)}

    def _cache_counts(self) -> dict[str, float]:
        return self.cache.stats() if self.cache is not None else {"hits": 0, "misses": 0, "errors": 0}

    def metrics(self, reset: bool = False) -> dict[str, float]:
        """Flat per-step metrics since the last reset: `endpoint/{url}/...`, `cache/...`, `domain/{name}/...`, and
        `teachers/{domain}/fingerprint` (see fingerprint_id)."""
        out: dict[str, float] = {}
        for url, r in self._replicas.items():
            out.update({f"endpoint/{url}/{name}": value for name, value in r.stats.snapshot().items()})
            out[f"endpoint/{url}/breaker_open"] = float(r.breaker.is_open)
        cache = {k: v - self._cache_base[k] for k, v in self._cache_counts().items()}
        lookups = cache["hits"] + cache["misses"]
        out.update({f"cache/{k}": v for k, v in cache.items()})
        out["cache/hit_rate"] = cache["hits"] / lookups if lookups else 0.0
        out.update({f"teachers/{k}": v - self._wire_base[k] for k, v in self._wire_bytes().items()})
        for domain in self._pools:
            stats = self._domain_stats[domain]
            out.update({f"domain/{domain}/scored": stats.scored, f"domain/{domain}/masked": stats.masked,
                        f"domain/{domain}/cached": stats.cached})
            if self._pools[domain].digest is not None:
                out[f"teachers/{domain}/fingerprint"] = fingerprint_id(self._pools[domain].digest)
        if reset:
            self.reset_metrics()
        return out

    def reset_metrics(self) -> None:
        for r in self._replicas.values():
            r.stats = EndpointStats()
        self._domain_stats.clear()
        self._cache_base = self._cache_counts()
        self._wire_base = self._wire_bytes()

    async def aclose(self) -> None:
        """Closes the teacher clients and the cache the router was given."""
        await asyncio.gather(*(r.client.aclose() for r in self._replicas.values()))
        if self.cache is not None:
            await self.cache.aclose()


def _candidate_k(item: ScoreItem) -> int:
    return item.candidates_array.shape[1] if item.candidates is not None and len(item.candidates) else 0


def _to_cache(span: ScoredSpan) -> np.ndarray:
    """A cache value: the span's log-probs, then its distribution row by row when it has one, then its candidates'
    log-probs row by row and their tails when it has them."""
    parts = [span.logprobs]
    if span.distribution is not None:
        parts.append(span.distribution.reshape(-1))
    if span.candidate_k:
        parts += [span.candidate_logprobs.reshape(-1), span.tail_logprobs]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _from_cache(value: np.ndarray, item: ScoreItem) -> ScoredSpan:
    """A cached value (`_to_cache`'s layout, its size already checked) back into its span; the router wraps a plain
    span (no candidates, no distribution) itself, without the slicing."""
    n = item.response_length
    span, rest = ScoredSpan(value[:n]), value[n:]
    if k := _candidate_k(item):
        span.candidate_logprobs, span.tail_logprobs = rest[-n * (k + 1):-n].reshape(n, k), rest[-n:]
        rest = rest[:-n * (k + 1)]
    span.distribution = rest.reshape(n, -1) if item.distribution else None
    return span


def _with_images(requests: list[tuple[str, ScoreItem]], images: Sequence[Sequence[bytes]],
                 idx: list[int]) -> tuple[list[ScoreItem], list[bytes]]:
    """One HTTP request's items, pointing into its distinct images."""
    shared, refs = share_images([images[i] for i in idx])
    items = [requests[i][1].model_copy(update={"image_indices": r}) if r else requests[i][1]
             for i, r in zip(idx, refs, strict=True)]
    return items, shared
