"""DeepSpeed's `deepspeed.comm` functions: torch.distributed's, under DeepSpeed's names and signatures.

Code written for DeepSpeed (and accelerate, and transformers) calls `deepspeed.comm.get_rank()` and
friends. These forward to torch.distributed; `get_local_rank` reads the launcher's LOCAL_RANK.
"""
from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from ..config.unbuilt import unbuilt_function

ReduceOp = dist.ReduceOp
is_initialized = dist.is_initialized
is_available = dist.is_available
get_rank = dist.get_rank
get_world_size = dist.get_world_size
get_global_rank = dist.get_global_rank
get_backend = dist.get_backend
new_group = dist.new_group
barrier = dist.barrier
monitored_barrier = dist.monitored_barrier
broadcast = dist.broadcast
all_reduce = dist.all_reduce
reduce = dist.reduce
all_gather = dist.all_gather
all_gather_into_tensor = dist.all_gather_into_tensor
reduce_scatter = dist.reduce_scatter
reduce_scatter_tensor = dist.reduce_scatter_tensor
all_to_all_single = dist.all_to_all_single
send = dist.send
recv = dist.recv
isend = dist.isend
irecv = dist.irecv
destroy_process_group = dist.destroy_process_group
log_summary = unbuilt_function("the comms logger (comms_logger)", "deepspeed.comm.log_summary")


def get_local_rank() -> int:
    """This process's rank on its node, as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_world_group() -> Any:
    return dist.group.WORLD


__all__ = ["ReduceOp", "all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all_single", "barrier", "broadcast",
           "destroy_process_group", "get_backend", "get_global_rank", "get_local_rank", "get_rank", "get_world_group",
           "get_world_size", "irecv", "is_available", "is_initialized", "isend", "log_summary", "monitored_barrier",
           "new_group", "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "send"]
