"""Weights from the trainer to vLLM's workers through vLLM's own weight-transfer framework, with a gloo data plane.

vLLM standardised trainer -> sampler weight sync as an engine pair: a worker-side `WeightTransferEngine`, created in
the worker's `load_model` when the engine has a `weight_transfer_config`, and a trainer-side
`TrainerWeightTransferEngine` that drives the worker's four control-plane calls (init, start, update, finish) through a
`VLLMWeightSyncClient` and sends the data. vLLM's data planes are CUDA only (NCCL, IPC). This pair follows the dense
NCCL engine's structure with gloo instead: a `ProcessGroupGloo` over its own `TCPStore`, hosted by the trainer's
sending process, apart from any default process group its accelerate launch holds. So on CPU the whole path runs -
control plane, the worker's weight-update methods, layerwise reload, `model.load_weights` - and only the broadcast
differs from a GPU deployment, which takes vLLM's "nccl" engines through the same calls.

`register()` adds "gloo" to both of vLLM's factories; the rollout server calls it before its engine is created.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import ClassVar

import torch
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

GLOO = "gloo"
JOINED = "workers-joined"  # store counters: workers connected to the store, and waiting in this round's receive
READY = "receivers-ready"
POLL_S = 0.005


@dataclass
class GlooWorkerInitInfo(WeightTransferInitInfo):
    """What a worker needs to join the trainer's group: the trainer's store, its own rank offset (1: the trainer is
    rank 0) and the group's size (the trainer and every worker)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 600.0


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer-side init info; `backend` is the key of vLLM's trainer factory. `master_port` is where the sending
    process hosts the store the workers rendezvous at."""

    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int = 2
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """One round's parameters, in broadcast order (the same fields as the NCCL engine's dense update info)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: {len(self.names)}, "
                             f"{len(self.dtype_names)}, {len(self.shapes)}")


def _group(store: TCPStore, rank: int, world_size: int, timeout_s: float) -> ProcessGroupGloo:
    """A gloo group of its own (the default process group, if any, is left alone); blocks until every rank joins."""
    return ProcessGroupGloo(PrefixStore("uniopd-weights", store), rank, world_size, timedelta(seconds=timeout_s))


def _await_workers(store: TCPStore, key: str, workers: int, call: Future, timeout_s: float, what: str) -> None:
    """Until `workers` have counted themselves in at `key`. The trainer blocks in a collective only then: a server
    that refuses the control-plane `call` answers without its workers coming, and that error is raised here instead
    of a collective waiting out its timeout."""
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < workers:
        if call.done():
            call.result()
            raise RuntimeError(f"the server answered before its workers {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the rollout server's workers did not {what} within {timeout_s}s")
        time.sleep(POLL_S)
    store.delete_key(key)


class GlooWeightTransferEngine(WeightTransferEngine[GlooWorkerInitInfo, GlooUpdateInfo]):
    """Worker side: joins the trainer's gloo group, receives each round tensor by tensor and loads it through the
    layerwise reload that vLLM's NCCL engine uses (start: layers to meta; finish: processed and back in place)."""

    init_info_cls = GlooWorkerInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.store: TCPStore | None = None
        self.group: ProcessGroupGloo | None = None

    def init_transfer_engine(self, init_info: GlooWorkerInitInfo) -> None:
        self.shutdown()
        p = self.parallel_config
        rank = init_info.rank_offset + p.data_parallel_index * p.world_size + p.rank  # as vLLM's NCCL workers
        store = TCPStore(init_info.master_address, init_info.master_port, init_info.world_size, is_master=False,
                         timeout=timedelta(seconds=init_info.timeout_s))
        store.add(JOINED, 1)
        self.store, self.group = store, _group(store, rank, init_info.world_size, init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        """The base class ends with an accelerator sync, which fails on a machine without one; gloo's calls have
        returned when the data is here."""
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None or self.store is None:
            raise RuntimeError("gloo weight transfer not initialised: call init_weight_transfer_engine first")
        self.store.add(READY, 1)  # the trainer broadcasts only once every worker is here (see _await_workers)
        bad = None
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes,
                                           strict=True):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name), device="cpu")
            self.group.broadcast(weight, 0).wait()
            bad = bad or (None if bool(weight.isfinite().all()) else name)
            if bad is None:  # after a bad tensor the rest is received (the trainer is still sending) but not loaded
                self.model.load_weights([(name, weight.to(self.device))])
        if bad is not None:  # a diverged trainer must not take sampling down with it
            raise ValueError(f"tensor {bad!r} holds NaN or inf; the tensors after it were not loaded")

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
        self.group = self.store = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side. Every trainer process calls `trainer_init` and `send_weights`: the sender (rank 0) hosts the
    store, drives the control plane and broadcasts; the others only iterate the source, which is what joins them to
    the FSDP2 gathers (`full_tensor()`) the sender's iteration takes part in.

    Unlike vLLM's NCCL trainer engine, the sender joins the group only once every worker has reached the store, and
    broadcasts only once every worker waits in its receive (counters in the store): a server that refuses (a group
    size, a name or shape it does not serve) answers the call without its workers coming, and that error reaches the
    trainer instead of a collective that waits for no one."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool = True,
                 timeout_s: float = 600.0) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.timeout_s = timeout_s
        self.workers = 0
        self.store: TCPStore | None = None
        self.group: ProcessGroupGloo | None = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("gloo trainer weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, timeout_s=init_info.timeout_s)
        if not engine.is_sender:
            return engine
        engine.workers = init_info.world_size - 1
        store = TCPStore(init_info.master_address, init_info.master_port, init_info.world_size, is_master=True,
                         timeout=timedelta(seconds=init_info.timeout_s), wait_for_workers=False)
        worker_info = GlooWorkerInitInfo(init_info.master_address, store.port, 1, init_info.world_size,
                                         init_info.timeout_s)
        # the workers block in init until the group forms, so the call runs beside the trainer's own join
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(client.init_weight_transfer_engine, asdict(worker_info))
            _await_workers(store, JOINED, engine.workers, future, init_info.timeout_s, "join the group")
            engine.group = _group(store, 0, init_info.world_size, init_info.timeout_s)
            future.result()
        finally:
            exe.shutdown(wait=False)  # a call that failed its side of a collective may not return; do not wait
        engine.store = store
        return engine

    def send_weights(self) -> None:
        source = self.source
        assert source is not None  # trainer_init requires one
        if not self.is_sender:
            for _ in source:  # the gathers are collectives: every process iterates in step with the sender
                pass
            return
        meta = source.metadata()
        update = GlooUpdateInfo(names=[m.name for m in meta], dtype_names=[str(m.dtype).removeprefix("torch.")
                                                                           for m in meta],
                                shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        exe = ThreadPoolExecutor(max_workers=1)
        try:
            future = exe.submit(self.client.update_weights, asdict(update))
            _await_workers(self.store, READY, self.workers, future, self.timeout_s, "start receiving")
            for _, tensor in _checked(source, meta):
                self.group.broadcast(tensor.detach().contiguous().cpu(), 0).wait()
            future.result()
        finally:
            exe.shutdown(wait=False)  # after a failed broadcast the call may never return; do not wait for it
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
        self.group = self.store = None


def _checked(source: WeightSource, meta: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """The source's tensors, each checked against the metadata the workers were sent: a mismatch would split the
    stream differently on each side."""
    for i, ((name, tensor), m) in enumerate(zip(source, meta, strict=True)):
        if (name, tensor.dtype, tuple(tensor.shape)) != (m.name, m.dtype, m.shape):
            raise ValueError(f"WeightSource yielded {name!r} {tensor.dtype} {tuple(tensor.shape)} at {i}, "
                             f"metadata() declared {m.name!r} {m.dtype} {m.shape}")
        yield name, tensor


def register() -> None:
    """Add "gloo" to vLLM's worker and trainer engine factories (once per process)."""
    with contextlib.suppress(ValueError):  # "already registered"
        WeightTransferEngineFactory.register_engine(GLOO, GlooWeightTransferEngine)
    with contextlib.suppress(ValueError):
        WeightTransferTrainerFactory.register_engine(GLOO, GlooTrainerWeightTransferEngine)
