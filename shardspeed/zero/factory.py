"""The one place a ZeRO stage is chosen; the engine never branches on the stage elsewhere."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm.topology import Topology
from ..config.errors import ConfigError
from ..config.schema import ShardspeedConfig
from ..runtime.loss_scaler import LossScaler
from .base import ZeroStrategy
from .partitioned import PartitionedOptimizer
from .stage0 import ReplicatedOptimizer

_COMM_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def build_zero_strategy(
    cfg: ShardspeedConfig,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    topology: Topology,
    loss_scaler: LossScaler,
) -> ZeroStrategy:
    zero = cfg.zero_optimization
    if zero.stage == 3:
        raise ConfigError("`zero_optimization.stage` 3 is not supported yet by shardspeed (this version has stages 0-2); set it to 0, 1 or 2")
    for name in ("offload_optimizer", "offload_param"):
        section = getattr(zero, name)
        if section is not None and section.device != "none":
            raise ConfigError(f"`zero_optimization.{name}.device` {section.device!r} is not supported yet by shardspeed; set it to \"none\"")
    comm_dtype = _COMM_DTYPES[cfg.communication_data_type] if cfg.communication_data_type else None
    predivide = cfg.gradient_predivide_factor if cfg.prescale_gradients else None
    check_overflow = cfg.fp16.enabled or (cfg.bf16.enabled and cfg.bf16.check_grad_overflow)
    if zero.stage in (1, 2):
        dp = topology.axis("data")
        return PartitionedOptimizer(
            module, optimizer, dp, loss_scaler, stage=zero.stage,
            reduce_bucket_size=zero.reduce_bucket_size, allgather_bucket_size=zero.allgather_bucket_size,
            # gloo's reduce-scatter is an all-reduce underneath: one all-reduce is the cheaper way there.
            reduce_scatter=zero.reduce_scatter and dist.get_backend(dp.group) != "gloo",
            overlap_comm=zero.overlap_comm_resolved, check_overflow=check_overflow,
            comm_dtype=comm_dtype, predivide=predivide,
        )
    return ReplicatedOptimizer(
        module, optimizer, topology.axis("data"), loss_scaler,
        bucket_elements=zero.reduce_bucket_size, check_overflow=check_overflow,
        comm_dtype=comm_dtype, predivide=predivide,
    )
