"""DeepSpeed's `deepspeed.comm` functions: torch.distributed's, under DeepSpeed's names and signatures.

Code written for DeepSpeed (and accelerate, and transformers) calls `deepspeed.comm.get_rank()` and
friends. These forward to torch.distributed; `get_local_rank` reads the launcher's LOCAL_RANK. The
collectives look torch.distributed's function up at call time (so the comms logger, which wraps those,
sees them once) and take DeepSpeed's extra keywords `prof`, `log_name` and `debug`.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from .comms_logging import comms_logger

ReduceOp = dist.ReduceOp
is_initialized = dist.is_initialized
is_available = dist.is_available
get_rank = dist.get_rank
get_world_size = dist.get_world_size
get_global_rank = dist.get_global_rank
get_backend = dist.get_backend
new_group = dist.new_group
monitored_barrier = dist.monitored_barrier
destroy_process_group = dist.destroy_process_group


def _collective(op: str) -> Callable[..., Any]:
    """`deepspeed.comm.<op>`: torch.distributed's `op`, also taking DeepSpeed's `prof`, `log_name` and `debug`."""

    @functools.wraps(getattr(dist, op))
    def call(*args: Any, prof: bool = False, log_name: str | None = None, debug: Any = None, **kwargs: Any) -> Any:
        target = getattr(dist, op)  # the comms logger's wrapper while it is enabled
        if not (prof or log_name):
            return target(*args, **kwargs)
        with comms_logger.naming(log_name, prof):
            return target(*args, **kwargs)
    return call


broadcast = _collective("broadcast")
all_reduce = _collective("all_reduce")
reduce = _collective("reduce")
all_gather = _collective("all_gather")
all_gather_into_tensor = _collective("all_gather_into_tensor")
reduce_scatter = _collective("reduce_scatter")
reduce_scatter_tensor = _collective("reduce_scatter_tensor")
all_to_all_single = _collective("all_to_all_single")
all_to_all = _collective("all_to_all")
send = _collective("send")
recv = _collective("recv")
isend = _collective("isend")
irecv = _collective("irecv")
barrier = _collective("barrier")


def get_local_rank() -> int:
    """This process's rank on its node, as the launcher set it (0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_world_group() -> Any:
    return dist.group.WORLD


def configure(deepspeed_config: Any = None, enabled: bool | None = None, prof_all: bool | None = None,
              prof_ops: list[str] | None = None, verbose: bool | None = None, debug: bool | None = None) -> None:
    """DeepSpeed's `deepspeed.comm.configure`: set up the comms logger from a parsed config whose
    `comms_logger` section is enabled (the engine does this at initialize), then from the keywords given."""
    section = getattr(deepspeed_config, "comms_logger", None)
    if section is not None and section.enabled:
        comms_logger.configure(True, section.prof_all, section.prof_ops, section.verbose, section.debug)
    comms_logger.configure(enabled, prof_all, prof_ops, verbose, debug)


def log_summary(show_straggler: bool = False, return_dict: bool = False) -> dict[str, Any] | None:
    """Print the comms logger's table on rank 0 (every rank must call it: it synchronises them), and
    return DeepSpeed's dictionary (summary, straggler_analysis, metadata) when `return_dict`."""
    if dist.is_initialized():
        comms_logger.original("barrier")()
    speaks = not dist.is_initialized() or dist.get_rank() == 0
    result = comms_logger.log_all(print_log=speaks, show_straggler=show_straggler, return_dict=return_dict)
    if dist.is_initialized():
        comms_logger.original("barrier")()
    return result


def reset_log() -> None:
    """Forget what the comms logger has recorded (for per-epoch or per-interval summaries)."""
    comms_logger.reset_data()


def has_comm_data() -> bool:
    return comms_logger.has_data()


def get_comm_operation_count() -> int:
    return comms_logger.get_total_operations()


def get_logged_comm_ops() -> list[str]:
    return comms_logger.get_operation_names()


__all__ = ["ReduceOp", "all_gather", "all_gather_into_tensor", "all_reduce", "all_to_all", "all_to_all_single", "barrier",
           "broadcast", "comms_logger", "configure", "destroy_process_group", "get_backend", "get_comm_operation_count",
           "get_global_rank", "get_local_rank", "get_logged_comm_ops", "get_rank", "get_world_group", "get_world_size",
           "has_comm_data", "irecv", "is_available", "is_initialized", "isend", "log_summary", "monitored_barrier",
           "new_group", "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "reset_log", "send"]
