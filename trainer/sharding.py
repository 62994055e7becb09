"""The trainer's processes under `accelerate launch`: DDP, or FSDP2 (sharded parameters, gradients and optimizer
state) from an accelerate config; and the student's weights as one safetensors payload, gathered tensor by tensor.

accelerate (1.16) turns an FSDP launch into FSDP only on GPU-like devices. On a machine without one, the processes of
an FSDP config start unaware of each other (each one its own "main" process), or as DDP with ACCELERATE_USE_CPU. torch's
`fully_shard` runs on CPU over gloo, so `accelerator()` puts such processes in one gloo group and hands accelerate the
FSDP2 plugin it built from the launch environment: the CPU config shards as it says, and the suite checks the sharded
path without a GPU.
"""

from __future__ import annotations

import json
import os
import struct

import torch

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def accelerator():
    """accelerate's Accelerator as launched; FSDP2 also on CPU processes (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (fsdp and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()):
        return Accelerator()
    plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
    acc = Accelerator(cpu=True, fsdp_plugin=plugin)  # MULTI_CPU over gloo, the plugin left unused...
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    acc.state.fsdp_plugin = plugin  # ...until here
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return acc


def gathered_safetensors(model, keep: bool) -> bytearray | None:
    """The model's state as safetensors bytes, on the process that `keep`s them; every process must call this.

    Entries sharded by FSDP2 (DTensors) are gathered one at a time (`full_tensor()`, a collective) and copied into a
    buffer sized from their global shapes up front, so the caller never holds the gathered state beside the payload:
    its memory is the payload plus the largest tensor. Unsharded entries (DDP, one process) are copied as they are.
    """
    state = model.state_dict()
    header, size = {}, 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [size, size + n]}
        size += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads its header to 8 bytes
    out = bytearray(8 + len(head) + size) if keep else None
    if out is not None:
        out[:8 + len(head)] = struct.pack("<Q", len(head)) + head
    for name, t in state.items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor: every process takes part
        if out is not None:
            start, end = header[name]["data_offsets"]
            dest = torch.frombuffer(out, dtype=torch.uint8, count=end - start, offset=8 + len(head) + start)
            dest.copy_(full.detach().contiguous().reshape(-1).view(torch.uint8))
        del full
    return out
