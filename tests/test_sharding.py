"""The sharded trainer's pieces that need no second process: the weight payload gathered tensor by tensor (the
2-process FSDP2 run is in test_train_e2e.py), its upload in pieces, and the accelerate configs as accelerate reads
them."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from modeling.loading import from_pretrained
from proto.client import RolloutClient
from services.rollout_server.app import create_app
from tests.doubles import GeneratorDouble
from tests.inprocess import BASE_URL, transport, wait_loaded
from trainer.sharding import gathered_safetensors

ADMIN = "admin-key-0123"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_payload_is_the_state_dict_built_in_one_buffer(tiny_model, dtype):
    model = from_pretrained(tiny_model, dtype)
    tracemalloc.start()
    payload = gathered_safetensors(model, keep=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < len(payload) + (64 << 10)  # the payload and a header: no second serialized copy on the way
    state, got = model.state_dict(), load(bytes(payload))
    assert got.keys() == state.keys() and all(torch.equal(got[k], v) and got[k].dtype == v.dtype
                                              for k, v in state.items())
    assert gathered_safetensors(model, keep=False) is None  # a process that only takes part in the gathering


class Recording(GeneratorDouble):
    def load_weights(self, tensors: dict) -> None:
        super().load_weights(tensors)
        self.tensors = tensors


async def test_a_payload_buffer_is_uploaded_as_is(tiny_model):
    model = from_pretrained(tiny_model)
    app = create_app(Recording, tiny_model, admin_keys=[ADMIN])
    async with app.router.lifespan_context(app):
        await wait_loaded(app)
        async with RolloutClient(BASE_URL, admin_key=ADMIN, transport=transport(app)) as client:
            loaded = await client.push_weights(gathered_safetensors(model, keep=True))
    state = model.state_dict()
    assert loaded.tensors == len(state)
    assert all(torch.equal(app.state.service.generator.tensors[k], v) for k, v in state.items())


@pytest.mark.parametrize("name", ["fsdp2-cpu", "fsdp2-gpu", "fsdp2-multinode"])
def test_the_accelerate_configs_launch_fsdp2_with_sharded_checkpoints(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    multinode = name == "fsdp2-multinode"
    rank = ["--machine_rank", "1"] if multinode else []  # the second node's command line (README)
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), *rank,
                                               "-m", "uniopd", "train", "--config", "run.yaml"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == ("no" if name == "fsdp2-cpu" else "bf16")
    assert (args.num_machines, args.machine_rank) == ((2, 1) if multinode else (1, 0))
