"""Weights through vLLM's weight-transfer framework, in-process: the gloo engine pair (trainer side from vLLM's
factory, worker side over a recording model) moving real tensors; the rollout app's /v1/weights/transfer routes
over a generator double (auth, validation naming the field, the round's state, generation waiting for a round, a
broken-off round); the hf backend's and the CLI's refusals; the run config's option.

A real rollout server with vLLM's in-process engine receiving over gloo: test_weight_transfer_server.py (e2e)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save

from proto.errors import ApiError
from services.rollout_server.app import create_app
from tests.conftest import HAS_VLLM
from tests.doubles import GeneratorDouble, TransferDouble
from tests.inprocess import bearer, running, until

ADMIN = "admin-secret-1"
USER = "user-key-1"
INIT = {"master_address": "127.0.0.1", "master_port": 29555, "rank_offset": 1, "world_size": 2}

needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed")


# ---- the gloo engine pair ------------------------------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """A worker's model as the engine sees it: `load_weights` of (name, tensor) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, weights) -> None:
        self.got += [(name, t.clone()) for name, t in weights]


class Student(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 4)
        self.scale = torch.nn.Parameter(torch.randn(3, 5, dtype=torch.bfloat16))


class EngineServer:
    """VLLMWeightSyncClient over a worker engine in this process, driven as the rollout server's routes drive it (its
    start and finish skip the layerwise reload that only a vLLM model has); `refuse`: the init or update call raises
    without the worker taking part, as a 422 from the server does."""

    def __init__(self, engine, refuse: Exception | None = None, refuse_init: bool = False) -> None:
        self.engine, self.refuse, self.refuse_init = engine, refuse, refuse_init
        self.calls: list[str] = []

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.calls.append("init")
        if self.refuse_init:
            raise self.refuse
        self.engine.init_transfer_engine(self.engine.parse_init_info(init_info))

    def start_weight_update(self) -> None:
        self.calls.append("start")

    def update_weights(self, update_info: dict) -> None:
        self.calls.append("update")
        if self.refuse is not None:
            raise self.refuse
        self.engine.update_weights(update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append("finish")


def engine_pair(student: torch.nn.Module, refuse: Exception | None = None, refuse_init: bool = False):
    from vllm.config import WeightTransferConfig
    from vllm.distributed.weight_transfer import ModuleSource, WeightTransferTrainerFactory

    from modeling.weight_transfer import GlooTrainerInitInfo, GlooWeightTransferEngine, register

    register()
    config = SimpleNamespace(parallel_config=SimpleNamespace(data_parallel_index=0, world_size=1, rank=0),
                             model_config=None)
    worker = GlooWeightTransferEngine(WeightTransferConfig(backend="gloo"), config, torch.device("cpu"), Recorder())
    server = EngineServer(worker, refuse, refuse_init)
    info = GlooTrainerInitInfo(rank=0, master_address="127.0.0.1", master_port=0, timeout_s=30)
    trainer = WeightTransferTrainerFactory.trainer_init(info, client=server, source=ModuleSource(student))
    return trainer, worker, server


@needs_vllm
def test_gloo_engines_move_every_tensor_round_after_round():
    student = Student()
    trainer, worker, server = engine_pair(student)
    try:
        for _ in range(2):  # the second round finds the receivers' counter reset
            worker.model.got.clear()
            trainer.send_weights()
            sent = dict(student.named_parameters())
            assert [name for name, _ in worker.model.got] == list(sent)
            for name, t in worker.model.got:
                assert t.dtype == sent[name].dtype and torch.equal(t, sent[name].detach())
            with torch.no_grad():
                student.proj.weight.add_(1.0)
        assert server.calls == ["init", "start", "update", "finish", "start", "update", "finish"]
        assert not torch.distributed.is_initialized()  # a group of its own: no default process group made or used
    finally:
        trainer.shutdown()
        worker.shutdown()


@needs_vllm
def test_a_refused_round_fails_the_trainer_at_once_instead_of_a_broadcast_that_waits():
    refusal = ApiError(422, "invalid_weights", "tensor 'proj.weight' has shape (4, 6), expected (4, 8)",
                       "update_info.shapes[0]")
    trainer, worker, server = engine_pair(Student(), refuse=refusal)
    started = time.monotonic()
    try:
        with pytest.raises(ApiError) as exc:
            trainer.send_weights()
    finally:
        trainer.shutdown()
        worker.shutdown()
    assert exc.value is refusal and time.monotonic() - started < 10  # not the 30 s broadcast timeout
    assert worker.model.got == [] and server.calls == ["init", "start", "update"]


@needs_vllm
def test_a_refused_init_fails_the_trainer_at_once_instead_of_a_rendezvous_that_waits():
    refusal = ApiError(422, "invalid_field", "world_size 2: ...", "init_info.world_size")
    started = time.monotonic()
    with pytest.raises(ApiError) as exc:
        engine_pair(Student(), refuse=refusal, refuse_init=True)
    assert exc.value is refusal and time.monotonic() - started < 10  # not the 30 s rendezvous timeout


@needs_vllm
def test_a_tensor_with_nan_stops_loading_but_the_stream_is_drained():
    student = Student()
    with torch.no_grad():
        student.proj.bias[1] = float("nan")
    trainer, worker, _ = engine_pair(student)
    try:
        with pytest.raises(ValueError, match=r"'proj.bias' holds NaN or inf"):
            trainer.send_weights()  # returns: the worker received the rest, so the broadcast did not wait on it
    finally:
        trainer.shutdown()
        worker.shutdown()
    assert [name for name, _ in worker.model.got] == ["scale", "proj.weight"]  # the tensors before it


# ---- the rollout app's control plane -------------------------------------------------------------------------------

def transfer_app(tiny_model, transfer: TransferDouble | None, admin: bool = True):
    generator = GeneratorDouble(transfer=transfer)
    app = create_app(lambda: generator, tiny_model, api_keys=[USER], admin_keys=[ADMIN] if admin else [])
    return app, generator


def declared(tiny_model, **changes) -> dict:
    """The update info of the tiny model's own tensors, some entries replaced."""
    tensors = load_file(tiny_model / "model.safetensors")
    info = {"names": list(tensors), "dtype_names": ["float32"] * len(tensors),
            "shapes": [list(t.shape) for t in tensors.values()]}
    for key, (i, value) in changes.items():
        info[key][i] = value
    return info


async def post(client, step: str, body: dict | None = None, key: str = ADMIN):
    return await client.post(f"/v1/weights/transfer/{step}", json=body, headers=bearer(key))


async def test_a_round_loads_and_makes_the_next_version(tiny_model):
    transfer = TransferDouble()
    app, _ = transfer_app(tiny_model, transfer)
    info = declared(tiny_model)
    async with running(app) as client:
        assert (await post(client, "init", {"init_info": {**INIT, "timeout_s": 60}})).json()["backend"] == "double"
        assert (await post(client, "start")).json() == {"backend": "double", "updating": True, "tensors": 0,
                                                         "weight_version": 0}
        state = (await post(client, "update", {"update_info": info})).json()
        assert state["tensors"] == len(info["names"])
        loaded = (await post(client, "finish")).json()
        gen = await client.post("/v1/generate", json={"prompts": [[5, 6]], "max_tokens": 2}, headers=bearer(USER))
    size = sum(t.numel() * 4 for t in load_file(tiny_model / "model.safetensors").values())
    assert loaded == {"weight_version": 1, "tensors": len(info["names"]), "bytes": size}
    assert gen.json()["weight_version"] == 1
    assert [c[0] for c in transfer.calls] == ["init", "start", "receive", "finish"]
    assert transfer.calls[0][1] == {**INIT, "timeout_s": 60} and transfer.calls[2][1] == info


async def test_generation_waits_for_the_open_round(tiny_model):
    transfer = TransferDouble(held=True)
    app, _ = transfer_app(tiny_model, transfer)
    async with running(app) as client:
        await post(client, "init", {"init_info": INIT})
        await post(client, "start")
        update = asyncio.create_task(post(client, "update", {"update_info": declared(tiny_model)}))
        await until(transfer.gate.entered.is_set, "the receive")
        gen = asyncio.create_task(client.post("/v1/generate", json={"prompts": [[5, 6]], "max_tokens": 2},
                                              headers=bearer(USER)))
        await asyncio.sleep(0.1)
        assert not gen.done()  # a half-loaded model does not sample
        transfer.gate.open()
        assert (await update).status_code == 200
        await asyncio.sleep(0.05)
        assert not gen.done()  # still the open round
        assert (await post(client, "finish")).json()["weight_version"] == 1
        assert (await gen).json()["weight_version"] == 1


@pytest.mark.parametrize(("change", "field"), [
    ({"names": (0, "model.nonexistent.weight")}, "update_info.names[0]"),
    ({"shapes": (2, [3, 3])}, "update_info.shapes[2]"),
    ({"dtype_names": (1, "int64")}, "update_info.dtype_names[1]"),
])
async def test_a_refused_update_names_the_field_moves_nothing_and_closes_the_round(tiny_model, change, field):
    transfer = TransferDouble()
    app, _ = transfer_app(tiny_model, transfer)
    async with running(app) as client:
        await post(client, "init", {"init_info": INIT})
        await post(client, "start")
        resp = await post(client, "update", {"update_info": declared(tiny_model, **change)})
        gen = await client.post("/v1/generate", json={"prompts": [[5, 6]], "max_tokens": 2}, headers=bearer(USER))
        finish = await post(client, "finish")
    assert resp.status_code == 422 and resp.json()["error"]["field"] == field
    assert [c[0] for c in transfer.calls] == ["init", "start", "abort"]  # no receive; the model is whole
    assert gen.status_code == 200 and gen.json()["weight_version"] == 0
    assert finish.status_code == 409


async def test_requests_the_control_plane_refuses(tiny_model):
    app, _ = transfer_app(tiny_model, TransferDouble())
    async with running(app) as client:
        assert (await post(client, "start")).status_code == 409  # no trainer has joined
        assert (await post(client, "init", {"init_info": INIT}, key=USER)).status_code == 401
        assert (await client.post("/v1/weights/transfer/init", json={"init_info": INIT})).status_code == 401
        wrong_size = await post(client, "init", {"init_info": {**INIT, "world_size": 3}})
        extra = await post(client, "init", {"init_info": {**INIT, "nccl_unique_id_b64": "AAAA"}})
        foreign = await post(client, "init", {"init_info": {**INIT, "packed": True}})  # the engine's own check
        assert (await post(client, "update", {"update_info": declared(tiny_model)})).status_code == 409
        uneven = await post(client, "update", {"update_info": {"names": ["a"], "dtype_names": [], "shapes": [[1]]}})
        await post(client, "init", {"init_info": INIT})
        await post(client, "start")
        assert (await post(client, "start")).status_code == 409  # one round at a time
    assert (wrong_size.status_code, wrong_size.json()["error"]["field"]) == (422, "init_info.world_size")
    assert (extra.status_code, extra.json()["error"]["field"]) == (422, "init_info.nccl_unique_id_b64")
    assert (foreign.status_code, foreign.json()["error"]["field"]) == (422, "init_info")
    assert uneven.status_code == 422 and "as long as each other" in uneven.json()["error"]["message"]


async def test_without_a_transfer_engine_or_admin_keys(tiny_model):
    app, _ = transfer_app(tiny_model, None)
    async with running(app) as client:
        resp = await post(client, "init", {"init_info": INIT})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "unsupported"
    app, _ = transfer_app(tiny_model, TransferDouble(), admin=False)
    async with running(app) as client:
        resp = await client.post("/v1/weights/transfer/start")
    assert resp.status_code == 403 and "--admin-keys" in resp.json()["error"]["message"]


async def test_a_broken_off_round_leaves_no_sampling_until_a_complete_update(tiny_model):
    transfer = TransferDouble(fail_receive=True)
    app, _ = transfer_app(tiny_model, transfer)
    gen = {"prompts": [[5, 6]], "max_tokens": 2}
    async with running(app) as client:
        await post(client, "init", {"init_info": INIT})
        await post(client, "start")
        failed = await post(client, "update", {"update_info": declared(tiny_model)})
        refused = await client.post("/v1/generate", json=gen, headers=bearer(USER))
        push = await client.post("/v1/weights", content=save(load_file(tiny_model / "model.safetensors")),
                                 headers={**bearer(ADMIN), "Content-Type": "application/octet-stream"})
        again = await client.post("/v1/generate", json=gen, headers=bearer(USER))
    assert failed.status_code == 502 and "broadcast broke off" in failed.json()["error"]["message"]
    assert [c[0] for c in transfer.calls] == ["init", "start", "receive", "abort"]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "weights_incomplete"
    assert push.status_code == 200 and again.json()["weight_version"] == 1


async def test_a_new_init_ends_the_round_its_trainer_left_open(tiny_model):
    transfer = TransferDouble()
    app, _ = transfer_app(tiny_model, transfer)
    async with running(app) as client:
        await post(client, "init", {"init_info": INIT})
        await post(client, "start")  # and the trainer died
        await post(client, "init", {"init_info": INIT})
        gen = await client.post("/v1/generate", json={"prompts": [[5, 6]], "max_tokens": 2}, headers=bearer(USER))
    assert [c[0] for c in transfer.calls] == ["init", "start", "abort", "init"]
    assert gen.status_code == 200  # nothing had moved: the model is whole


# ---- refusals outside the routes; the trainer's side ---------------------------------------------------------------

async def test_the_hf_backend_refuses_naming_why(tiny_model):
    from services.rollout_server.backends.hf import HFGenerator

    app = create_app(lambda: HFGenerator(tiny_model, device="cpu"), tiny_model, admin_keys=[ADMIN])
    async with running(app) as client:
        resp = await post(client, "init", {"init_info": INIT})
    assert resp.status_code == 400 and "hf backend has no weight-transfer engine" in resp.json()["error"]["message"]


def test_the_cli_refuses_weight_transfer_with_the_hf_backend(tiny_model, cli_error_in_process):
    err = cli_error_in_process(["rollout", "serve", "--model", str(tiny_model), "--backend", "hf",
                                "--weight-transfer", "gloo"])
    assert "--weight-transfer" in err and "--backend vllm" in err


def test_weight_sync_is_a_run_config_option():
    from pydantic import ValidationError

    from trainer.config import RolloutConfig

    assert RolloutConfig(url="http://x").weight_sync == "http"
    with pytest.raises(ValidationError, match="weight_sync"):
        RolloutConfig(url="http://x", weight_sync="tcp")


@needs_vllm
def test_the_sync_client_is_vllms_protocol():
    from vllm.distributed.weight_transfer import VLLMWeightSyncClient

    from proto.client import WeightSyncClient

    client = WeightSyncClient("http://127.0.0.1:1")
    assert isinstance(client, VLLMWeightSyncClient)
    client.close()

