"""The student's weights to the sampler through vLLM's weight-transfer engine (rollout.weight_sync gloo or nccl), in
place of the safetensors push.

vLLM's trainer-side engine drives the rollout server's /v1/weights/transfer routes through a WeightSyncClient and
broadcasts the tensors to the server's workers: over gloo (modeling.weight_transfer) on CPU, over vLLM's own NCCL
engine on GPU. Every trainer process takes part: the main process (rank 0, the sender) gathers and broadcasts, the
others iterate the same ModuleSource, whose `full_tensor()` gathers of FSDP2's sharded parameters are collectives -
as in gathered_safetensors. No serialized copy of the student is built or kept.
"""

from __future__ import annotations

import socket

from proto.client import WeightSyncClient
from proto.rollout import WeightsLoaded
from trainer.config import RolloutConfig

SERVER_WORKERS = 1  # a rollout server's vLLM engine runs one worker (no tensor or pipeline parallelism)


class EngineSync:
    def __init__(self, rollout: RolloutConfig, model, rank: int, admin_key: str | None) -> None:
        from vllm.distributed.weight_transfer import ModuleSource

        from modeling.weight_transfer import register

        register()
        self.config, self.rank = rollout, rank
        self.source = ModuleSource(model)
        self.client = WeightSyncClient(rollout.url, admin_key, rollout.timeout_s)
        self.engine = None

    def connect(self) -> None:
        """Form the group with the server's workers (the main process; the others only build their engine). Again
        after a server restart: the new server has no group."""
        from vllm.distributed.weight_transfer import WeightTransferTrainerFactory

        self.close_engine()
        self.engine = WeightTransferTrainerFactory.trainer_init(self._init_info(), client=self.client,
                                                                source=self.source)

    def _init_info(self):
        c = self.config
        port = c.weight_sync_port or (_free_port(c.weight_sync_host) if self.rank == 0 else 0)
        if c.weight_sync == "gloo":
            from modeling.weight_transfer import GlooTrainerInitInfo

            return GlooTrainerInitInfo(rank=self.rank, master_address=c.weight_sync_host, master_port=port,
                                       world_size=1 + SERVER_WORKERS, timeout_s=c.timeout_s)
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(rank=self.rank, master_address=c.weight_sync_host, master_port=port,
                                   world_size=1 + SERVER_WORKERS)

    def push(self) -> WeightsLoaded | None:
        """One round; every process calls it. The main process gets what the server made of it."""
        self.engine.send_weights()
        return self.client.loaded if self.rank == 0 else None

    def reconnect_and_push(self) -> WeightsLoaded:
        """The last weights again, to a restarted server (one trainer process: nothing else needs to gather)."""
        self.connect()
        return self.push()

    def close_engine(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def close(self) -> None:
        self.close_engine()
        self.client.close()


def _free_port(host: str) -> int:
    """A port for the rendezvous store; vLLM's NCCL rendezvous binds the number it is given, so 0 will not do."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
