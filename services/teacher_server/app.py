"""The teacher HTTP app: thin routes over a TeacherService (scorer + batcher + limits)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from proto.codec import ScoredSpan, decode_score_request, encode_score_response, wants_msgpack
from proto.errors import ApiError, field_path
from proto.fingerprint import make_fingerprint
from proto.schemas import (
    API_VERSION,
    JSON,
    MSGPACK,
    ErrorBody,
    Fingerprint,
    ScoreItem,
    ScoreRequest,
    ScoreResponse,
    TeacherInfo,
)
from services.teacher_server.auth import ApiKeyChecker
from services.teacher_server.batcher import MicroBatcher, QueueFull
from services.teacher_server.limits import BodyLimitMiddleware, Limits, validate_items
from services.teacher_server.metrics import Metrics, MetricsMiddleware
from services.teacher_server.scorer import Scorer

log = logging.getLogger("uniopd.teacher")

ERRORS = {
    400: "Malformed body or unsupported operation",
    401: "Missing or invalid API key",
    413: "Body, batch or request token count over the limit",
    415: "Unsupported Content-Type",
    422: "A field is invalid (the error names it)",
    429: "Queue full; retry after the Retry-After seconds",
    503: "Model not loaded yet",
}


def error_responses(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": ERRORS[c]} for c in codes}


class TeacherService:
    """Holds the scorer once loaded; every scoring route goes through `score`."""

    def __init__(self, load: Callable[[], Scorer], domains: Sequence[str], limits: Limits) -> None:
        self._load = load
        self.domains = list(domains)
        self.limits = limits
        self.metrics = Metrics()
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
        self.fingerprint = make_fingerprint(i.model, i.revision, i.tokenizer_fingerprint, i.dtype, i.backend)
        self.scorer = scorer
        log.info("ready: %s (%s, %s), fingerprint %s", i.model, i.backend, i.dtype, self.fingerprint.digest[:12])

    def _score_batch(self, items: list[ScoreItem]) -> list[ScoredSpan]:
        return self.scorer.score(items)

    def ready(self) -> Scorer:
        if self.load_error:
            raise ApiError(503, "load_failed", f"model failed to load: {self.load_error}")
        if self.scorer is None:
            raise ApiError(503, "not_ready", "model is loading", headers={"Retry-After": "5"})
        return self.scorer

    async def score(self, items: Sequence[ScoreItem]) -> list[ScoredSpan]:
        validate_items(items, self.ready().info(), self.limits)
        try:
            spans = await self.batcher.submit(items)
        except QueueFull as exc:
            retry = max(1, round(self.limits.batch_wait_ms / 1000 + 1))
            raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": str(retry)}) from None
        self.metrics.scored_tokens.inc(sum(len(s.logprobs) for s in spans))
        return spans

    def info(self) -> TeacherInfo:
        i = self.ready().info()
        return TeacherInfo(api_version=API_VERSION, model=i.model, revision=i.revision,
                           tokenizer_fingerprint=i.tokenizer_fingerprint, vocab_size=i.vocab_size,
                           max_length=i.max_length, max_top_k=i.max_top_k, dtype=i.dtype, backend=i.backend,
                           domains=self.domains, fingerprint=self.fingerprint, limits=self.limits.as_dict())


_UNSUPPORTED = {"literal_error", "extra_forbidden"}


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            return _error_response(ApiError(400, "malformed_body", "body is not valid JSON"))
        loc = tuple(err.get("loc", ()))
        field = field_path(loc[1:] if loc[:1] == ("body",) else loc) or None
        if err.get("type") in _UNSUPPORTED:  # a value or field outside the scoring subset of a compat API
            return _error_response(ApiError(400, "unsupported", f"{field}: {err.get('msg')}; this teacher only "
                                            "scores token ids", field))
        return _error_response(ApiError(422, "invalid_field", f"{field or 'body'}: {err.get('msg')}", field))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(ApiError(500, "internal", f"{type(exc).__name__}: scoring failed"))


def _auth_dependency(api_keys: Sequence[str]) -> list:
    if not api_keys:
        return []
    checker = ApiKeyChecker(list(api_keys))
    bearer = HTTPBearer(auto_error=False, description="API key from the server's --api-keys file or env")

    def require_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        checker.check(creds.credentials if creds else None)

    return [Depends(require_key)]


def _install_openapi(app: FastAPI, service: TeacherService) -> None:
    """Publish the JSON schema of /v1/score's body (the route parses it itself to negotiate encodings), with the
    limits of the model actually served once it is loaded, so the schema says what this server accepts."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        js = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        components["ScoreRequest"] = js
        if service.scorer is None:
            app.openapi_schema = None  # regenerate with the model's limits once it is loaded
            return schema
        info, item = service.scorer.info(), components["ScoreItem"]["properties"]
        item["input_ids"]["items"]["maximum"] = info.vocab_size - 1
        item["input_ids"]["maxItems"] = info.max_length
        item["response_start"]["maximum"] = info.max_length - 1
        item["top_k"]["maximum"] = info.max_top_k
        js["properties"]["items"]["maxItems"] = service.limits.max_batch_items
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


_BINARY = {"schema": {"type": "string", "format": "binary"}}


def create_app(load: Callable[[], Scorer], domains: Sequence[str] = (), limits: Limits | None = None,
               api_keys: Sequence[str] = ()) -> FastAPI:
    from services.teacher_server.compat import compat_router

    service = TeacherService(load, domains, limits or Limits())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = asyncio.create_task(service.start())
        yield
        loading.cancel()
        await service.batcher.stop()

    app = FastAPI(title="uniopd teacher", version=API_VERSION, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    auth = _auth_dependency(api_keys)

    @app.get("/healthz", responses=error_responses(400))
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(400, 503))
    async def readyz() -> dict[str, str]:
        service.ready()
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/info", dependencies=auth, responses=error_responses(400, 401, 503))
    async def info() -> TeacherInfo:
        return service.info()

    @app.post(
        "/v1/score",
        dependencies=auth,
        response_class=Response,
        responses={200: {"model": ScoreResponse, "content": {MSGPACK: _BINARY},
                         "description": "JSON, or msgpack when Accept asks for it (see proto/codec.py)"},
                   **error_responses(400, 401, 413, 415, 422, 429, 503)},
        openapi_extra={"requestBody": {"required": True, "content": {
            JSON: {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}, MSGPACK: _BINARY}}},
    )
    async def score(request: Request) -> Response:
        req = decode_score_request(await request.body(), request.headers.get("content-type"))
        spans = await service.score(req.items)
        binary = wants_msgpack(request.headers.get("accept"))
        body = encode_score_response(service.fingerprint, spans, binary)
        return Response(body, media_type=MSGPACK if binary else JSON)

    app.include_router(compat_router(service), dependencies=auth)
    _install_openapi(app, service)
    routes = {r.path for r in app.routes}
    app.add_middleware(BodyLimitMiddleware, max_bytes=service.limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics, routes=routes)  # outermost: sees every 413
    return app
