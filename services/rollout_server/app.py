"""The rollout HTTP app: thin routes over a RolloutService (generator + weight updates + limits).

Generation and weight loads run on one worker thread, in arrival order: a generation that started before a weight
update finishes on the old weights, one that arrives during it waits, and every response names its weight version.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request, Response
from prometheus_client import Counter, Gauge

from proto.codec import image_bytes, media_type, parse_json, wants_msgpack
from proto.errors import ApiError
from proto.rollout import (
    GenerateRequest,
    GenerateResponse,
    RolloutInfo,
    Rollouts,
    WeightsFromPath,
    WeightsLoaded,
    encode_generate_response,
    response_tokens,
)
from proto.schemas import API_VERSION, JSON, MSGPACK
from services.common.http import (
    BINARY_BODY,
    HttpMetrics,
    add_probes,
    bearer_auth,
    error_responses,
    finish_app,
    install_error_handlers,
    publish_schemas,
    require_loaded,
)
from services.common.images import decode_images
from services.common.models import load_tokenizer
from services.rollout_server.generator import Generator, SamplingOptions
from services.rollout_server.limits import RolloutLimits, check_expanded, validate_prompts
from services.rollout_server.weights import check_tensors, expected_shapes, read_safetensors_file, tensors_from_path

log = logging.getLogger("uniopd.rollout")
SAFETENSORS = "application/octet-stream"
MAX_CHARS_PER_TOKEN = 32  # no tokenizer in use averages more characters per token than this


class RolloutMetrics(HttpMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.generated_tokens = Counter("uniopd_generated_tokens", "Tokens sampled", registry=r)
        self.weight_loads = Counter("uniopd_weight_loads", "Successful weight updates", registry=r)
        self.weight_version = Gauge("uniopd_weight_version", "Version of the weights being served", registry=r)
        self.pending = Gauge("uniopd_pending_requests", "Generate requests queued or running", registry=r)


class RolloutService:
    def __init__(self, load: Callable[[], Generator], model_dir: Path, limits: RolloutLimits,
                 weights_root: Path | None) -> None:
        self._load, self.model_dir, self.limits, self.weights_root = load, model_dir, limits, weights_root
        self.metrics = RolloutMetrics()
        self.generator: Generator | None = None
        self.load_error: str | None = None
        self.weight_version = 0
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generator")
        # chat prompts are templated and tokenized off the event loop, one at a time (one tokenizer object)
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    def _run(self, fn: Callable, *args):
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def start(self) -> None:
        try:
            self.generator = await self._run(self._load)
            self.tokenizer = load_tokenizer(self.model_dir)
            self.shapes = expected_shapes(self.model_dir)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.generator = None
            log.exception("model failed to load")

    def stop(self) -> None:
        for executor in (self._executor, self._tokenizing):
            executor.shutdown(wait=False, cancel_futures=True)

    def ready(self) -> Generator:
        return require_loaded(self.generator, self.load_error)

    def info(self) -> RolloutInfo:
        i = self.ready().info()
        return RolloutInfo(model=i.model, revision=i.revision, tokenizer_fingerprint=i.tokenizer_fingerprint,
                           vocab_size=i.vocab_size, max_length=i.max_length, dtype=i.dtype, backend=i.backend,
                           weight_version=self.weight_version, eos_token_ids=list(i.eos_token_ids),
                           image_token_id=i.image_token_id, limits=self.limits.as_dict())

    def _render(self, req: GenerateRequest, max_length: int) -> list[list[int]]:
        """Token ids of the prompts; chat conversations are bounded by their length in characters before they are
        templated and tokenized (a 14 MB message once held the server for a minute)."""
        if req.prompts is not None:
            return req.prompts
        for i, conv in enumerate(req.messages):
            if (chars := sum(len(m.content) for m in conv)) > max_length * MAX_CHARS_PER_TOKEN:
                raise ApiError(413, "too_long", f"messages[{i}] has {chars} characters: more than the max length "
                               f"{max_length} tokens can hold", f"messages[{i}]")
        rendered = []
        for conv in req.messages:
            text = self.tokenizer.apply_chat_template([m.model_dump() for m in conv], add_generation_prompt=True,
                                                      tokenize=False)
            rendered.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return rendered

    async def generate(self, req: GenerateRequest) -> Rollouts:
        generator = self.ready()
        info = generator.info()
        prompts = await asyncio.get_running_loop().run_in_executor(self._tokenizing, self._render, req,
                                                                   info.max_length)
        validate_prompts(prompts, req.n, req.max_tokens, req.stop_token_ids, info, self.limits, req.image_indices,
                         len(req.images))
        if self._pending >= self.limits.max_pending_requests:
            raise ApiError(429, "queue_full", f"{self._pending} requests pending", headers={"Retry-After": "1"})
        options = SamplingOptions(n=req.n, temperature=float(req.temperature), top_p=float(req.top_p),
                                  top_k=req.top_k, max_tokens=req.max_tokens,
                                  stop_token_ids=tuple(req.stop_token_ids), seed=req.seed)

        decoded = await asyncio.to_thread(decode_images, image_bytes(req.images), self.limits.images) \
            if req.images else []
        images = [tuple(decoded[j] for j in refs) for refs in req.image_indices] \
            if decoded and req.image_indices else None
        if images:
            check_expanded(prompts, images, req.max_tokens, generator.image_positions, info, self.limits)

        def work() -> Rollouts:  # on the worker thread, so the version read is the one that samples
            samples = generator.generate(prompts, options, images)
            return Rollouts(generator.info().model, self.weight_version,
                            [np.asarray(p, dtype=np.int32) for p in prompts], samples)

        self._pending += 1
        self.metrics.pending.set(self._pending)
        try:
            rollouts = await self._run(work)
        finally:
            self._pending -= 1
            self.metrics.pending.set(self._pending)
        self.metrics.generated_tokens.inc(response_tokens(rollouts.samples))
        return rollouts

    async def load_weights(self, tensors: dict, size: int) -> WeightsLoaded:
        generator = self.ready()
        check_tensors(tensors, self.shapes)

        def work() -> int:
            generator.load_weights(tensors)
            self.weight_version += 1
            return self.weight_version

        version = await self._run(work)
        self.metrics.weight_loads.inc()
        self.metrics.weight_version.set(version)
        log.info("weights updated: version %d (%d tensors, %d bytes)", version, len(tensors), size)
        return WeightsLoaded(weight_version=version, tensors=len(tensors), bytes=size)


async def _spool(request: Request) -> tuple[Path, int]:
    """Stream the body to a temporary file: a multi-GB upload never sits in memory twice."""
    tmp = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)  # noqa: SIM115 (closed below)
    size = 0
    try:
        async for chunk in request.stream():
            tmp.write(chunk)
            size += len(chunk)
    except BaseException:
        tmp.close()
        Path(tmp.name).unlink(missing_ok=True)
        raise
    tmp.close()
    return Path(tmp.name), size



def create_app(load: Callable[[], Generator], model_dir: Path, limits: RolloutLimits | None = None,
               api_keys: Sequence[str] = (), admin_keys: Sequence[str] = (),
               weights_root: Path | None = None, metrics_keys: Sequence[str] = ()) -> FastAPI:
    service = RolloutService(load, Path(model_dir), limits or RolloutLimits(), weights_root)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = asyncio.create_task(service.start())
        yield
        loading.cancel()
        service.stop()

    app = FastAPI(title="uniopd rollout", version=API_VERSION, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    auth = bearer_auth(api_keys)
    admin = bearer_auth(admin_keys, scheme_name="AdminBearer", description="admin key (--admin-keys)")

    add_probes(app, service.ready, service.metrics, metrics_keys)

    @app.get("/v1/info", dependencies=auth, responses=error_responses(400, 401, 503))
    async def info() -> RolloutInfo:
        return service.info()

    @app.post("/v1/generate", dependencies=auth, response_class=Response,
              responses={200: {"model": GenerateResponse, "content": {MSGPACK: BINARY_BODY},
                               "description": "JSON, or msgpack when Accept asks for it (see proto/rollout.py)"},
                         **error_responses(400, 401, 413, 422, 429, 503)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  JSON: {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}})
    async def generate(request: Request) -> Response:
        req = parse_json(GenerateRequest, await request.body())
        rollouts = await service.generate(req)
        binary = wants_msgpack(request.headers.get("accept"))
        return Response(encode_generate_response(rollouts, binary), media_type=MSGPACK if binary else JSON)

    @app.post("/v1/weights", dependencies=admin,
              responses={200: {"model": WeightsLoaded}, **error_responses(400, 401, 403, 413, 415, 422, 503)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  SAFETENSORS: BINARY_BODY, JSON: {"schema": {"$ref": "#/components/schemas/WeightsFromPath"}}}}})
    async def weights(request: Request) -> WeightsLoaded:
        if not admin_keys:
            raise ApiError(403, "forbidden", "weight updates are disabled: start the server with --admin-keys")
        service.ready()
        kind = media_type(request.headers.get("content-type"))
        if kind == JSON:
            req = parse_json(WeightsFromPath, await request.body())
            tensors = tensors_from_path(req.path, service.weights_root)
            return await service.load_weights(tensors, sum(t.numel() * t.element_size() for t in tensors.values()))
        if kind != SAFETENSORS:
            raise ApiError(415, "unsupported_media_type", f"Content-Type must be {SAFETENSORS} (safetensors bytes) or "
                           f"{JSON} ({{\"path\": ...}}), got {kind!r}")
        path, size = await _spool(request)
        try:
            return await service.load_weights(read_safetensors_file(path), size)
        finally:
            path.unlink(missing_ok=True)

    publish_schemas(app, GenerateRequest, WeightsFromPath)
    finish_app(app, service.metrics, service.limits.max_body_bytes, service.limits.headers,
               {"/v1/weights": service.limits.max_weights_bytes})
    return app
