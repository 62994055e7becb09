"""The teacher HTTP app: thin routes over a TeacherService (scorer + batcher + limits)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Depends, FastAPI, Request, Response

from proto.codec import ScoredSpan, decode_score_request, encode_score_response, image_bytes, wants_msgpack
from proto.errors import ApiError
from proto.fingerprint import make_fingerprint
from proto.schemas import (
    API_VERSION,
    JSON,
    MSGPACK,
    Fingerprint,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    TeacherInfo,
    TeamUsage,
)
from services.common.auth import KeyStore, KeyTable, Team
from services.common.http import (
    BINARY_BODY,
    add_probes,
    error_responses,
    finish_app,
    install_error_handlers,
    publish_schemas,
    read_parsed,
    require_loaded,
    team_auth,
)
from services.common.images import decode_images
from services.teacher_server.batcher import MicroBatcher, QueueFull
from services.teacher_server.limits import Limits, check_expanded, validate_items
from services.teacher_server.metrics import Metrics
from services.teacher_server.quotas import OverQuota, QuotaExceeded, Quotas, Ticket
from services.teacher_server.scorer import Scorer

log = logging.getLogger("uniopd.teacher")


class TeacherService:
    """Holds the scorer once loaded; every scoring route goes through `score`, as some team."""

    def __init__(self, load: Callable[[], Scorer], domains: Sequence[str], limits: Limits) -> None:
        self._load = load
        self.domains = list(domains)
        self.limits = limits
        self.metrics = Metrics()
        self.quotas = Quotas(stats=self.metrics)
        self.scorer: Scorer | None = None
        self.fingerprint: Fingerprint | None = None
        self.load_error: str | None = None
        self.batcher: MicroBatcher | None = None

    async def start(self) -> None:
        self.batcher = MicroBatcher(self._score_batch, self.limits.max_batch_tokens, self.limits.batch_wait_ms / 1000,
                                    self.limits.max_queue_items, self.metrics)
        self.batcher.start()
        try:
            scorer = await self.batcher.run_in_worker(self._load)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model failed to load")
            return
        i = scorer.info()
        self.fingerprint = make_fingerprint(i.model, i.revision, i.tokenizer_fingerprint, i.dtype, i.backend,
                                            i.processor_fingerprint)
        self.scorer = scorer
        log.info("ready: %s (%s, %s), fingerprint %s", i.model, i.backend, i.dtype, self.fingerprint.digest[:12])

    def _score_batch(self, items: list[ScoreItem], images: list[tuple] | None) -> list[ScoredSpan]:
        return self.scorer.score(items, images)

    def ready(self) -> Scorer:
        return require_loaded(self.scorer, self.load_error)

    @contextlib.asynccontextmanager
    async def admission(self, team: Team) -> AsyncIterator[Ticket]:
        """The request's quota ticket from before its body is read until it ends. A request its team's quotas refuse
        is refused unread, and answered after `refusal_delay_s` (at most its Retry-After): even an unread refusal
        costs the server its HTTP parsing and auth, and a client that retried at once made ~1,000 of them a second."""
        try:
            ticket = self.quotas.enter(team)
        except QuotaExceeded as exc:  # its body is left unread: closing the connection spares reading it at all
            await asyncio.sleep(min(exc.retry_after, self.limits.refusal_delay_s))
            raise _quota_error(exc, {"Connection": "close"}) from None
        try:
            yield ticket
        finally:
            self.quotas.release(ticket, scored=ticket.scored)

    async def score(self, items: Sequence[ScoreItem], ticket: Ticket, images: Sequence[bytes] = ()) -> list[ScoredSpan]:
        """Validate, then charge the team's tokens, then queue fairly (under `admission`)."""
        info = self.ready().info()
        validate_items(items, info, self.limits, len(images))
        decoded = await asyncio.to_thread(decode_images, images, self.limits.images) if images else []
        per_item = [tuple(decoded[j] for j in it.image_indices) for it in items] if decoded else None
        if per_item:
            check_expanded(items, per_item, self.scorer.image_positions, info, self.limits)
        self._charge(ticket, sum(it.response_length for it in items))
        team = ticket.team
        try:
            spans = await self.batcher.submit(items, team.name, team.weight, per_item)
        except QueueFull as exc:
            self.quotas.reject(team, "queue_full")
            retry = max(1, round(self.limits.batch_wait_ms / 1000 + 1))
            raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": str(retry)}) from None
        ticket.scored = True
        self.metrics.scored_tokens.inc(sum(len(s.logprobs) for s in spans))
        return spans

    def _charge(self, ticket: Ticket, tokens: int) -> None:
        try:
            self.quotas.charge(ticket, tokens)
        except OverQuota as exc:
            raise ApiError(413, "request_over_quota", str(exc), "items") from None
        except QuotaExceeded as exc:
            raise _quota_error(exc) from None

    def info(self) -> TeacherInfo:
        i = self.ready().info()
        return TeacherInfo(api_version=API_VERSION, model=i.model, revision=i.revision,
                           tokenizer_fingerprint=i.tokenizer_fingerprint, vocab_size=i.vocab_size,
                           max_length=i.max_length, max_top_k=i.max_top_k, dtype=i.dtype, backend=i.backend,
                           domains=self.domains, fingerprint=self.fingerprint, image_token_id=i.image_token_id,
                           candidate_scoring=i.candidate_scoring, limits=self.limits.as_dict())


def _quota_error(exc: QuotaExceeded, headers: dict[str, str] | None = None) -> ApiError:
    return ApiError(429, "quota_exceeded", str(exc), exc.limit,
                    {"Retry-After": str(exc.retry_after), **(headers or {})})


def _live_limits(service: TeacherService) -> Callable[[dict], bool]:
    """Once the model is loaded, the schema states this server's vocab, lengths and top-k."""

    def refine(components: dict) -> bool:
        if service.scorer is None:
            return False
        info, item = service.scorer.info(), components["ScoreItem"]["properties"]
        item["input_ids"]["items"]["maximum"] = info.vocab_size - 1
        item["input_ids"]["maxItems"] = info.max_length
        item["response_start"]["maximum"] = info.max_length - 1
        item["top_k"]["maximum"] = info.max_top_k
        components["ScoreRequest"]["properties"]["items"]["maxItems"] = service.limits.max_batch_items
        return True

    return refine


@contextlib.contextmanager
def _reload_on_sighup(keys: KeyStore):
    """`kill -HUP` reloads the keys file (only where there is one, and from the main thread, where signals go)."""
    hook = keys.path is not None and threading.current_thread() is threading.main_thread()
    if hook:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keys.reload)
    try:
        yield
    finally:
        if hook:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)


def create_app(load: Callable[[], Scorer], domains: Sequence[str] = (), limits: Limits | None = None,
               api_keys: Sequence[str] | KeyStore = (), metrics_keys: Sequence[str] = (),
               model_path: str = "model", open_metrics: bool = False) -> FastAPI:
    """`api_keys`: a KeyStore (teams, quotas, reloads) or a fixed list of keys of the team `default`;
    `metrics_keys`: the keys /metrics asks for (none: it is closed where there are API keys, unless `open_metrics`);
    `model_path`: the model as the operator named it, which the SGLang and OpenAI info routes report."""
    from services.teacher_server.compat import COMPAT_REQUESTS, compat_router

    service = TeacherService(load, domains, limits or Limits())
    keys = api_keys if isinstance(api_keys, KeyStore) else KeyStore(KeyTable.plain(api_keys))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = asyncio.create_task(service.start())
        with _reload_on_sighup(keys):
            yield
        loading.cancel()
        if service.batcher is not None:  # None when shut down before start-up ran
            await service.batcher.stop()

    app = FastAPI(title="uniopd teacher", version=API_VERSION, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    caller = team_auth(keys)  # routes take `team: Team = Depends(caller)`: the caller's team, or 401

    add_probes(app, service.ready, service.metrics, metrics_keys, closed=bool(keys.table) and not open_metrics)
    budget = service.limits.body_budget()

    @app.get("/v1/info", dependencies=[Depends(caller)], responses=error_responses(400, 401, 503))
    async def info() -> TeacherInfo:
        return service.info()

    @app.get("/v1/usage", responses=error_responses(400, 401))
    async def usage(team: Team = Depends(caller)) -> TeamUsage:  # noqa: B008
        """The calling team's own usage and limits (never another team's, never keys)."""
        return service.quotas.usage(team)

    @app.post(
        "/v1/score",
        response_class=Response,
        responses={200: {"model": ScoreResponse, "content": {MSGPACK: BINARY_BODY},
                         "description": "JSON, or msgpack when Accept asks for it (see proto/codec.py)"},
                   **error_responses(400, 401, 413, 415, 422, 429, 503)},
        openapi_extra={"requestBody": {"required": True, "content": {
            JSON: {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}, MSGPACK: BINARY_BODY}}},
    )
    async def score(request: Request, team: Team = Depends(caller)) -> Response:  # noqa: B008
        kind = request.headers.get("content-type")
        async with service.admission(team) as ticket:
            req = await read_parsed(request, lambda body: decode_score_request(body, kind, budget))
            spans = await service.score(req.items, ticket, image_bytes(req.images))
        binary = wants_msgpack(request.headers.get("accept"))
        body = encode_score_response(service.fingerprint, spans, binary, req.float_dtype)
        return Response(body, media_type=MSGPACK if binary else JSON)

    app.include_router(compat_router(service, caller, model_path))
    publish_schemas(app, ScoreRequest, *COMPAT_REQUESTS, refine=_live_limits(service))
    finish_app(app, service.metrics, service.limits.max_body_bytes, service.limits.headers)
    return app
