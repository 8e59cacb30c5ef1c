"""The one place a ZeRO stage is chosen; the engine never branches on the stage elsewhere."""
from __future__ import annotations

import torch
import torch.distributed as dist

from functools import partial
from typing import Any, Callable

from ..comm.topology import Topology
from ..config.errors import ConfigError
from ..config.schema import ShardspeedConfig
from ..offload.optimizer_offload import OffloadedOptimizer, Segment
from ..runtime.loss_scaler import LossScaler
from .base import NormScope, ZeroStrategy
from .param_shards import is_partitioned
from .partitioned import PartitionedOptimizer
from .stage3 import Stage3Optimizer
from .stage0 import ReplicatedOptimizer

_COMM_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def build_zero_strategy(
    cfg: ShardspeedConfig,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    topology: Topology,
    loss_scaler: LossScaler,
    timers: Any = None,
    norm_scope: NormScope = NormScope(),
) -> ZeroStrategy:
    """`norm_scope`: how the gradient norm spans a model replica split over ranks (pipeline, tensor parallel)."""
    zero = cfg.zero_optimization
    _check_param_offload(cfg)
    offload = _optimizer_offload(cfg, optimizer, timers) if optimizer is not None else None
    comm_dtype = _COMM_DTYPES[cfg.communication_data_type] if cfg.communication_data_type else None
    predivide = cfg.gradient_predivide_factor if cfg.prescale_gradients else None
    check_overflow = cfg.fp16.enabled or (cfg.bf16.enabled and cfg.bf16.check_grad_overflow)
    if zero.stage < 3 and any(is_partitioned(p) for p in module.parameters()):
        raise ConfigError(f"the model was built under shardspeed.zero.Init (its parameters are partitioned) but "
                          f"`zero_optimization.stage` is {zero.stage}; set it to 3")
    if zero.stage == 3:
        if norm_scope.spans_ranks:
            raise ConfigError("`zero_optimization.stage` 3 does not compose with tensor or pipeline parallelism in shardspeed "
                              "(as in DeepSpeed's AutoTP training: stages 0-2); set `zero_optimization.stage` to 1 or 2, "
                              "or `tensor_parallel.autotp_size` to 1")
        if optimizer is not None:
            _check_partitionable(optimizer, cfg.zero_allow_untested_optimizer)
        return Stage3Optimizer(
            module, optimizer, topology.axis("data"), loss_scaler,
            prefetch_bucket_size=zero.prefetch_bucket_size,
            param_persistence_threshold=zero.param_persistence_threshold,
            model_persistence_threshold=zero.model_persistence_threshold,
            max_live_parameters=zero.max_live_parameters, max_reuse_distance=zero.max_reuse_distance,
            check_overflow=check_overflow, comm_dtype=comm_dtype, predivide=predivide,
            leaf_modules=zero.leaf_module, module_granularity_threshold=zero.module_granularity_threshold,
            offload=offload, offload_param=zero.offload_param, aio=cfg.aio,
            memory_efficient_linear=zero.memory_efficient_linear,
        )
    if zero.stage in (1, 2):
        _check_partitionable(optimizer, cfg.zero_allow_untested_optimizer)
        dp = topology.axis("data")
        return PartitionedOptimizer(
            module, optimizer, dp, loss_scaler, stage=zero.stage,
            reduce_bucket_size=zero.reduce_bucket_size, allgather_bucket_size=zero.allgather_bucket_size,
            # gloo's reduce-scatter is an all-reduce underneath: one all-reduce is the cheaper way there.
            reduce_scatter=zero.reduce_scatter and dist.get_backend(dp.group) != "gloo",
            overlap_comm=zero.overlap_comm_resolved, check_overflow=check_overflow,
            comm_dtype=comm_dtype, predivide=predivide, offload=offload, norm_scope=norm_scope,
        )
    if offload is not None:
        raise ConfigError("`zero_optimization.offload_optimizer` needs ZeRO stage 1, 2 or 3 (it offloads the partitioned "
                          "optimizer states); set `zero_optimization.stage` to 1 or higher, or offload_optimizer.device to \"none\"")
    return ReplicatedOptimizer(
        module, optimizer, topology.axis("data"), loss_scaler,
        bucket_elements=zero.reduce_bucket_size, check_overflow=check_overflow,
        comm_dtype=comm_dtype, predivide=predivide, norm_scope=norm_scope,
    )


def _check_param_offload(cfg: ShardspeedConfig) -> None:
    zero = cfg.zero_optimization
    section = zero.offload_param
    if section is None or section.device == "none":
        return
    if zero.stage != 3:
        raise ConfigError(f"`zero_optimization.offload_param` offloads stage-3 parameter partitions but `zero_optimization.stage` "
                          f"is {zero.stage}; set the stage to 3 or offload_param.device to \"none\"")
    if section.device == "nvme":
        if not section.nvme_path:
            raise ConfigError("`zero_optimization.offload_param.nvme_path` must name a folder on a fast local disk when "
                              "offload_param.device is \"nvme\"")
        optimizer_section = zero.offload_optimizer
        if optimizer_section is None or optimizer_section.device == "none":
            raise ConfigError("`zero_optimization.offload_param.device` \"nvme\" needs the optimizer offloaded too: set "
                              "`zero_optimization.offload_optimizer.device` to \"cpu\" or \"nvme\"")


def _optimizer_offload(cfg: ShardspeedConfig, optimizer: torch.optim.Optimizer, timers: Any) -> Callable[[list[list[Segment]]], OffloadedOptimizer] | None:
    """How the stage builds its offloaded optimizer from its partition segments, or None without offload."""
    zero = cfg.zero_optimization
    section = zero.offload_optimizer
    if section is None or section.device == "none":
        return None
    if section.device == "nvme" and not section.nvme_path:
        raise ConfigError("`zero_optimization.offload_optimizer.nvme_path` must name a folder on a fast local disk when "
                          "offload_optimizer.device is \"nvme\"")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return partial(OffloadedOptimizer, optimizer, cfg=section, sub_group_size=zero.sub_group_size, aio=cfg.aio,
                   rank=rank, timers=timers)


def _elementwise_optimizers() -> tuple[type, ...]:
    from ..runtime.optimizers.factory import AdamNoBiasCorrection
    from ..runtime.optimizers.lion import Lion

    from ..offload.cpu_optimizers import DeepSpeedCPUAdagrad, DeepSpeedCPUAdam, FusedAdam

    o = torch.optim
    return (DeepSpeedCPUAdam, DeepSpeedCPUAdagrad, FusedAdam, o.Adam, o.AdamW, o.SGD, o.Adagrad, o.RMSprop, o.Adamax, o.NAdam, o.RAdam, o.Adadelta, Lion, AdamNoBiasCorrection)


def _check_partitionable(optimizer: torch.optim.Optimizer, allowed: bool) -> None:
    """ZeRO steps flat partitions, which is exact only for optimizers that update element by element.

    Lamb's per-parameter trust ratio, for one, would be computed over a partition instead.
    """
    if isinstance(optimizer, _elementwise_optimizers()) or allowed:
        return
    raise ConfigError(
        f"{type(optimizer).__name__} is not known to update element by element, so ZeRO stages 1-3 may change its "
        "results (Lamb's per-parameter trust ratio, for one, would span a whole partition). Use zero_optimization.stage 0, "
        "or set `zero_allow_untested_optimizer: true` to partition it anyway."
    )
