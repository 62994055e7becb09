"""The rollout HTTP app: thin routes over a RolloutService (generator + weight updates + limits).

Generation and weight loads run on one worker thread, in arrival order: a generation that started before a weight
update finishes on the old weights, one that arrives during it waits, and every response names its weight version.

Weights arrive as a safetensors push (POST /v1/weights) or, with --weight-transfer, through vLLM's weight-transfer
engine: the trainer's engine drives vLLM's four calls over POST /v1/weights/transfer/{init,start,update,finish}
and sends the tensors over its own data plane (gloo, NCCL). Between start and finish the model is half loaded, so
generation waits for the round to end; a round that breaks off after data moved leaves a partial model, and
generation answers 503 until the next complete weight update.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    TransferInit,
    TransferInitInfo,
    TransferState,
    TransferUpdate,
    TransferUpdateInfo,
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
    read_parsed,
    require_loaded,
)
from services.common.images import decode_images
from services.common.models import load_tokenizer
from services.rollout_server.generator import Generator, SamplingOptions, TransferUnavailable, WeightTransfer
from services.rollout_server.limits import RolloutLimits, check_expanded, validate_prompts
from services.rollout_server.waves import plan_waves
from services.rollout_server.weights import (
    check_declared,
    check_tensors,
    expected_shapes,
    read_safetensors_file,
    tensors_from_path,
)

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


@dataclass
class _Round:
    """An open weight-transfer round (between start and finish)."""

    tensors: int = 0
    bytes: int = 0
    touched: bool = False  # a receive began: ending the round early leaves a partial model


class RolloutService:
    def __init__(self, load: Callable[[], Generator], model_dir: Path, limits: RolloutLimits,
                 weights_root: Path | None) -> None:
        self._load, self.model_dir, self.limits, self.weights_root = load, model_dir, limits, weights_root
        self.metrics = RolloutMetrics()
        self.generator: Generator | None = None
        self.load_error: str | None = None
        self.weight_version = 0
        self.incomplete: str | None = None  # why the model holds a partial update; generation refuses until fixed
        self._round: _Round | None = None
        self._no_round = asyncio.Event()
        self._no_round.set()
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
        """Token ids of the prompts. Chat conversations are bounded by their characters before any is templated
        (all of them together, then each against what the max length can hold: a 14 MB message once held the server
        for a minute), and tokenized one at a time, refused as soon as their tokens pass --max-prompt-tokens (480
        conversations of 32k characters took 21 s of tokenizer before a check of the total)."""
        if req.prompts is not None:
            return req.prompts
        limit = self.limits.max_prompt_chars
        if (total := sum(len(m.content) for conv in req.messages for m in conv)) > limit:
            raise ApiError(413, "request_too_large", f"the messages hold {total} characters; one request may hold "
                           f"{limit} (the server's --max-prompt-chars): split it", "messages")
        for i, conv in enumerate(req.messages):
            if (chars := sum(len(m.content) for m in conv)) > max_length * MAX_CHARS_PER_TOKEN:
                raise ApiError(413, "too_long", f"messages[{i}] has {chars} characters: more than the max length "
                               f"{max_length} tokens can hold", f"messages[{i}]")
        rendered, tokens = [], 0
        for i, conv in enumerate(req.messages):
            text = self.tokenizer.apply_chat_template([m.model_dump() for m in conv], add_generation_prompt=True,
                                                      tokenize=False)
            rendered.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            if (tokens := tokens + len(rendered[-1])) > self.limits.max_prompt_tokens:
                raise ApiError(413, "request_too_large", f"messages[:{i + 1}] already hold {tokens} tokens; one "
                               f"request may hold {self.limits.max_prompt_tokens} (the server's "
                               "--max-prompt-tokens): split it", "messages")
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
        # greedy samples of one prompt are all the same: sampled once and copied (vLLM refuses n > 1 at temperature 0)
        copies = req.n if req.temperature == 0 else 1
        options = SamplingOptions(n=req.n // copies, temperature=float(req.temperature), top_p=float(req.top_p),
                                  top_k=req.top_k, max_tokens=req.max_tokens,
                                  stop_token_ids=tuple(req.stop_token_ids), seed=req.seed,
                                  batch_bytes=self.limits.batch_bytes)

        decoded = await asyncio.to_thread(decode_images, image_bytes(req.images), self.limits.images) \
            if req.images else []
        images = [tuple(decoded[j] for j in refs) for refs in req.image_indices] \
            if decoded and req.image_indices else None
        lengths = check_expanded(prompts, images, req.max_tokens, generator.image_positions, info, self.limits) \
            if images else list(map(len, prompts))
        if info.row_cost is not None:  # a row no wave can hold is refused now, not after the queue
            plan_waves(lengths, options.n, options.max_tokens, info.row_cost, options.batch_bytes)

        def work() -> Rollouts:  # on the worker thread, so the version read is the one that samples
            samples = generator.generate(prompts, options, images)
            return Rollouts(generator.info().model, self.weight_version,
                            [np.asarray(p, dtype=np.int32) for p in prompts], [g * copies for g in samples])

        self._pending += 1
        self.metrics.pending.set(self._pending)
        try:
            await self._no_round.wait()
            self._check_complete()
            rollouts = await self._run(work)
        finally:
            self._pending -= 1
            self.metrics.pending.set(self._pending)
        self.metrics.generated_tokens.inc(response_tokens(rollouts.samples) // copies)
        return rollouts

    def _check_complete(self) -> None:
        if self.incomplete is not None:
            raise ApiError(503, "weights_incomplete", self.incomplete, headers={"Retry-After": "5"})

    async def load_weights(self, tensors: dict, size: int) -> WeightsLoaded:
        generator = self.ready()
        check_tensors(tensors, self.shapes)
        await self._no_round.wait()
        return await self._loaded(lambda: generator.load_weights(tensors), len(tensors), size)

    async def _loaded(self, load: Callable[[], None], tensors: int, size: int) -> WeightsLoaded:
        """Run `load` on the worker thread and make its weights the next version."""
        def work() -> int:
            load()
            self.weight_version += 1
            return self.weight_version

        version = await self._run(work)
        self.incomplete = None
        self.metrics.weight_loads.inc()
        self.metrics.weight_version.set(version)
        log.info("weights updated: version %d (%d tensors, %d bytes)", version, tensors, size)
        return WeightsLoaded(weight_version=version, tensors=tensors, bytes=size)

    # ---- weights through vLLM's weight-transfer engine -----------------------------------------------------------

    def _transfer(self) -> WeightTransfer:
        try:
            return self.ready().weight_transfer()
        except TransferUnavailable as exc:
            raise ApiError(400, "unsupported", str(exc)) from None

    def _state(self, transfer: WeightTransfer) -> TransferState:
        return TransferState(backend=transfer.backend, updating=self._round is not None,
                             tensors=self._round.tensors if self._round else 0, weight_version=self.weight_version)

    def _open_round(self) -> _Round:
        if self._round is None:
            raise ApiError(409, "conflict", "no weight update is open: POST /v1/weights/transfer/start first")
        return self._round

    async def transfer_init(self, info: TransferInitInfo) -> TransferState:
        transfer = self._transfer()
        if info.world_size != info.rank_offset + transfer.workers:
            raise ApiError(422, "invalid_field", f"world_size {info.world_size}: the group is rank_offset "
                           f"{info.rank_offset} ranks and this server's {transfer.workers} worker(s)",
                           "init_info.world_size")
        if self._round is not None:  # its trainer is gone: a restarted one begins with init
            await self._end_round(transfer, self._round, "a new init ended the open round")
        try:
            await self._run(transfer.init, info.model_dump(exclude_none=True))
        except ValueError as exc:  # the engine's own check: a field its backend does not take
            raise ApiError(422, "invalid_field", str(exc), "init_info") from None
        except Exception as exc:
            raise ApiError(502, "transfer_failed", f"joining the trainer's group failed: {type(exc).__name__}: "
                           f"{exc}") from None
        return self._state(transfer)

    async def transfer_start(self) -> TransferState:
        transfer = self._transfer()
        if not transfer.joined:
            raise ApiError(409, "conflict", "no trainer has joined: POST /v1/weights/transfer/init first")
        if self._round is not None:
            raise ApiError(409, "conflict", "a weight update is already open: finish it first")
        self._round = round_ = _Round()
        self._no_round.clear()
        try:
            await self._run(transfer.start)
        except Exception as exc:
            await self._end_round(transfer, round_, f"start failed ({type(exc).__name__}: {exc})")
            raise
        return self._state(transfer)

    async def transfer_update(self, info: TransferUpdateInfo) -> TransferState:
        transfer = self._transfer()
        round_ = self._open_round()
        try:
            size = check_declared(info.names, info.dtype_names, info.shapes, self.shapes, "update_info")
        except ApiError as exc:  # the trainer gives up on the round: it must not keep generation waiting
            await self._end_round(transfer, round_, f"an update was refused ({exc.message})")
            raise
        round_.touched = True
        try:
            await self._run(transfer.receive, info.model_dump())
        except Exception as exc:
            why = f"receiving failed ({type(exc).__name__}: {exc})"
            await self._end_round(transfer, round_, why)
            raise ApiError(502, "transfer_failed", f"{why}; the round is over") from None
        round_.tensors += len(info.names)
        round_.bytes += size
        return self._state(transfer)

    async def transfer_finish(self) -> WeightsLoaded:
        transfer = self._transfer()
        round_ = self._open_round()
        try:
            loaded = await self._loaded(transfer.finish, round_.tensors, round_.bytes)
        except Exception as exc:
            await self._end_round(transfer, round_, f"finish failed ({type(exc).__name__}: {exc})")
            raise
        self._round = None
        self._no_round.set()
        return loaded

    async def _end_round(self, transfer: WeightTransfer, round_: _Round, why: str) -> None:
        """Close a round that will not finish; if data had moved, the model is partial until the next update."""
        if self._round is not round_:  # already ended (a new init and a failing receive can both end it)
            return
        ended = False
        try:
            await self._run(transfer.abort)
            ended = True
        finally:
            if round_.touched or not ended:
                self.incomplete = f"the served weights are a partial update: {why}; generation resumes after the " \
                                  "next complete weight update"
            log.warning("weight transfer round ended early: %s", why)
            self._round = None
            self._no_round.set()


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
               weights_root: Path | None = None, metrics_keys: Sequence[str] = (),
               open_metrics: bool = False) -> FastAPI:
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

    add_probes(app, service.ready, service.metrics, metrics_keys, closed=bool(api_keys) and not open_metrics)
    budget = service.limits.body_budget()

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
        req = await read_parsed(request, lambda body: parse_json(GenerateRequest, body, budget))
        rollouts = await service.generate(req)
        binary = wants_msgpack(request.headers.get("accept"))
        return Response(encode_generate_response(rollouts, binary), media_type=MSGPACK if binary else JSON)

    def updates_enabled() -> None:
        if not admin_keys:
            raise ApiError(403, "forbidden", "weight updates are disabled: start the server with --admin-keys")

    @app.post("/v1/weights", dependencies=admin,
              responses={200: {"model": WeightsLoaded}, **error_responses(400, 401, 403, 413, 415, 422, 503)},
              openapi_extra={"requestBody": {"required": True, "content": {
                  SAFETENSORS: BINARY_BODY, JSON: {"schema": {"$ref": "#/components/schemas/WeightsFromPath"}}}}})
    async def weights(request: Request) -> WeightsLoaded:
        updates_enabled()
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

    def json_body(model: type) -> dict:
        return {"requestBody": {"required": True, "content": {
            JSON: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}

    # vLLM's weight-transfer control plane (its api_router's init_weight_transfer_engine, start_weight_update,
    # update_weights, finish_weight_update), behind the admin key like POST /v1/weights
    @app.post("/v1/weights/transfer/init", dependencies=admin, openapi_extra=json_body(TransferInit),
              responses={200: {"model": TransferState}, **error_responses(400, 401, 403, 422, 502, 503)})
    async def transfer_init(request: Request) -> TransferState:
        """Join the trainer's group; returns once it has formed (the trainer joins at the same time)."""
        updates_enabled()
        return await service.transfer_init(parse_json(TransferInit, await request.body()).init_info)

    @app.post("/v1/weights/transfer/start", dependencies=admin,
              responses={200: {"model": TransferState}, **error_responses(400, 401, 403, 409, 503)})
    async def transfer_start() -> TransferState:
        """Open a round; generation waits until it finishes."""
        updates_enabled()
        return await service.transfer_start()

    @app.post("/v1/weights/transfer/update", dependencies=admin, openapi_extra=json_body(TransferUpdate),
              responses={200: {"model": TransferState}, **error_responses(400, 401, 403, 409, 422, 502, 503)})
    async def transfer_update(request: Request) -> TransferState:
        """Receive the declared tensors, checked against the served model first; returns once they are loaded."""
        updates_enabled()
        return await service.transfer_update(parse_json(TransferUpdate, await request.body()).update_info)

    @app.post("/v1/weights/transfer/finish", dependencies=admin,
              responses={200: {"model": WeightsLoaded}, **error_responses(400, 401, 403, 409, 503)})
    async def transfer_finish() -> WeightsLoaded:
        """Close the round: its weights sample from now on, as the next weight version."""
        updates_enabled()
        return await service.transfer_finish()

    publish_schemas(app, GenerateRequest, WeightsFromPath, TransferInit, TransferUpdate)
    finish_app(app, service.metrics, service.limits.max_body_bytes, service.limits.headers,
               {"/v1/weights": service.limits.max_weights_bytes})
    return app
