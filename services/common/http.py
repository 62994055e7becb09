"""Shared FastAPI plumbing: the error shape, bearer auth, body-size limit and per-route request metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from proto.errors import ApiError, field_path
from proto.schemas import ErrorBody
from services.common.auth import DEFAULT_TEAM, KeyStore, KeyTable, Team
from services.common.limits import HeaderLimits

log = logging.getLogger("uniopd.http")
T = TypeVar("T")

ERRORS = {
    400: "Malformed body or unsupported operation",
    401: "Missing or invalid API key",
    403: "The operation is disabled on this server",
    408: "The request body did not arrive within the server's --body-timeout-s",
    409: "Conflicts with the server's state",
    413: "Body, batch or request token count over the limit",
    415: "Unsupported Content-Type",
    422: "A field is invalid (the error names it)",
    429: "Queue full or a team quota reached; retry after the Retry-After seconds",
    502: "A weight transfer with the trainer broke off (the message says where)",
    503: "Model not loaded yet, or (rollout) its weights are a partial update",
}
_UNSUPPORTED = {"literal_error", "extra_forbidden"}


def error_responses(*codes: int) -> dict:
    return {c: {"model": ErrorBody, "description": ERRORS[c]} for c in codes}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def request_error(err: dict) -> ApiError:
    """A validation error of a request (FastAPI's or pydantic's) as the API's: 400 for a body that is not JSON or asks
    for what this server does not implement, else 422 naming the field."""
    if err.get("type") == "json_invalid":
        return ApiError(400, "malformed_body", "body is not valid JSON")
    loc = tuple(err.get("loc", ()))
    field = field_path(loc[1:] if loc[:1] == ("body",) else loc) or None
    if err.get("type") in _UNSUPPORTED:  # a value or field outside what this server implements
        return ApiError(400, "unsupported", f"{field}: {err.get('msg')}; not supported here", field)
    return ApiError(422, "invalid_field", f"{field or 'body'}: {err.get('msg')}", field)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request_error(exc.errors()[0]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=exc.headers))

    @app.exception_handler(Exception)
    async def crashed(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(ApiError(500, "internal", f"{type(exc).__name__}: the server failed"))


def bearer_auth(api_keys: Sequence[str], scheme_name: str = "HTTPBearer", description: str = "API key") -> list:
    """Route dependencies that demand one of `api_keys`; none when there are no keys (auth disabled)."""
    if not api_keys:
        return []
    table = KeyTable.plain(api_keys)
    bearer = HTTPBearer(auto_error=False, scheme_name=scheme_name, description=description)

    def require_key(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        table.lookup(creds.credentials if creds else None)

    return [Depends(require_key)]


def team_auth(keys: KeyStore) -> Callable[..., Awaitable[Team]]:
    """A route dependency that returns the caller's team. Without keys auth is off and every caller is the team
    `default`, with no limits. Async, so lookups and reloads of the keys file run on the event loop, one at a time."""
    if not keys.table:
        anyone = Team(DEFAULT_TEAM)

        async def anonymous() -> Team:
            return anyone

        return anonymous
    bearer = HTTPBearer(auto_error=False, description="API key (its team's quotas apply)")

    async def caller(request: Request, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Team:  # noqa: B008
        sent = creds.credentials if creds else "" if "authorization" in request.headers else None
        return keys.current().lookup(sent)

    return caller


class HttpMetrics:
    """Own registry per app, so several apps can live in one process (tests, benches)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("uniopd_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("uniopd_request_latency_seconds", "Request latency by route", ["route"],
                                 registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every response by route template and status; unknown paths share one label (fuzzers can't blow it up)."""

    def __init__(self, app, metrics: HttpMetrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = {"code": 500}
        start = time.perf_counter()

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 before reading a declared-too-large body, and as soon as a chunked body crosses the limit; 408 when the
    body has not all arrived `timeout_s` after the route began reading it (a client sending a byte now and then).

    `overrides` maps a path to its own limit (e.g. a weight upload may be far larger than a scoring request)."""

    def __init__(self, app, max_bytes: int, overrides: dict[str, int] | None = None,
                 timeout_s: float = HeaderLimits.body_timeout_s) -> None:
        self.app, self.max_bytes, self.overrides, self.timeout_s = app, max_bytes, overrides or {}, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.overrides.get(scope["path"], self.max_bytes)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _send_error(send, ApiError(413, "body_too_large", f"body exceeds {limit} bytes"))
            return
        seen, deadline, complete = 0, None, False

        async def counted():
            nonlocal seen, deadline, complete
            if complete:  # after the body: waiting for a disconnect, with no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except TimeoutError:
                raise ApiError(408, "body_timeout", f"the body did not arrive within {self.timeout_s:g} s (the "
                               "server's --body-timeout-s)", headers={"Connection": "close"}) from None
            seen += len(message.get("body", b""))
            if seen > limit:
                raise ApiError(413, "body_too_large", f"body exceeds {limit} bytes")
            complete = not message.get("more_body", False)
            return message

        await self.app(scope, counted, send)


class HeaderLimitMiddleware:
    """431 for a request with more header fields or bytes than the limits, before any route (or auth) reads them.
    What the server buffers is bounded earlier, by the HTTP parser (which refuses a header block still incomplete
    past the byte limit); a block that arrived whole within one read is measured here."""

    def __init__(self, app, limits: HeaderLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers, limits = scope["headers"], self.limits
            if len(headers) > limits.max_headers:
                await _send_error(send, ApiError(431, "too_many_headers", f"{len(headers)} header fields; limit is "
                                                 f"{limits.max_headers} (the server's --max-headers)", "headers"))
                return
            if (size := sum(len(k) + len(v) + 4 for k, v in headers)) > limits.max_header_bytes:  # ": " and CRLF
                await _send_error(send, ApiError(431, "headers_too_large", f"{size} bytes of header fields; limit "
                                                 f"is {limits.max_header_bytes} (the server's --max-header-bytes)",
                                                 "headers"))
                return
        await self.app(scope, receive, send)


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


BINARY_BODY = {"schema": {"type": "string", "format": "binary"}}
# bodies from this size on are parsed on a worker thread: the event loop then serves /healthz and other teams'
# small requests between the parser's Python steps (a JSON parse in C still holds the GIL: the body budget bounds it)
OFF_LOOP_BYTES = 64 << 10


async def read_parsed(request: Request, parse: Callable[[bytes], T]) -> T:
    """The request's body through `parse` (which checks its budget before parsing it), off the event loop when large."""
    body = await request.body()
    return parse(body) if len(body) < OFF_LOOP_BYTES else await asyncio.to_thread(parse, body)


def require_loaded(model, load_error: str | None):
    """The model once loaded; else 503 saying whether it is still loading or failed to load."""
    if load_error:
        raise ApiError(503, "load_failed", f"model failed to load: {load_error}")
    if model is None:
        raise ApiError(503, "not_ready", "model is loading", headers={"Retry-After": "5"})
    return model


def add_probes(app: FastAPI, ready: Callable[[], object], metrics: HttpMetrics,
               metrics_keys: Sequence[str] = (), closed: bool = False) -> None:
    """/healthz (process up), /readyz (model loaded): unauthenticated, for orchestrators. /metrics (Prometheus): with
    `metrics_keys` a scraper sends one as a bearer; without them it is open, unless `closed` (a server with API keys:
    /metrics names every team and its usage), where it answers 403 until metrics keys are given."""
    if metrics_keys:
        guard = bearer_auth(metrics_keys, scheme_name="MetricsBearer", description="metrics key (--metrics-keys)")
    else:
        guard = [Depends(_metrics_closed)] if closed else []

    @app.get("/healthz", responses=error_responses(400))
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses=error_responses(400, 503))
    async def readyz() -> dict[str, str]:
        ready()
        return {"status": "ready"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}},
             dependencies=guard)
    async def render_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")


def _metrics_closed() -> None:
    raise ApiError(403, "metrics_closed", "this server has API keys, and /metrics names every team and its usage: "
                   "start it with --metrics-keys (a scraper then sends one) or --open-metrics")


def publish_schemas(app: FastAPI, *models, refine: Callable[[dict], bool] | None = None) -> None:
    """Routes that parse their own body (to negotiate encodings) still publish its JSON schema in the OpenAPI.

    `refine(components)` may tighten the schemas (e.g. with a loaded model's limits); it returns False while the
    result is provisional, so the schema is built again on the next request."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
        app.openapi_schema = schema if refine is None or refine(components) else None
        return schema

    app.openapi = openapi


def finish_app(app: FastAPI, metrics: HttpMetrics, max_body_bytes: int, headers: HeaderLimits,
               overrides: dict[str, int] | None = None) -> None:
    """Add the middlewares once all routes exist (metrics outermost, so it sees every 413 and 431)."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes, overrides=overrides,
                       timeout_s=headers.body_timeout_s)
    app.add_middleware(HeaderLimitMiddleware, limits=headers)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes={r.path for r in app.routes})
