"""The one place a ZeRO stage is chosen; the engine never branches on the stage elsewhere.

A strategy gets its typed config section (`zero_optimization`), a `Precision`, the process group of
every optimizer param group (`ParamGroupComm`) and the reduction options: nothing else of the config.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from ..comm.topology import Axis, AxisGroup, Topology
from ..config.errors import ConfigError
from ..config.schema import ShardspeedConfig
from ..offload.optimizer_offload import OffloadedOptimizer
from ..optim.precision import Precision
from .base import NormScope, ParamGroupComm, ZeroStrategy
from .module_only import ModuleOnly
from .param_shards import is_partitioned
from .partitioned import PartitionedOptimizer
from .reducer import ReduceOptions
from .stage0 import ReplicatedOptimizer
from .stage3 import Offload, Stage3Optimizer

def stage3_with_model_parallel(tp_key: str = "tensor_parallel.autotp_size") -> str:
    return ("`zero_optimization.stage` 3 does not compose with tensor or pipeline parallelism in shardspeed (as in "
            f"DeepSpeed's AutoTP training: stages 0-2); set `zero_optimization.stage` to 1 or 2, or `{tp_key}` to 1")

_COMM_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
                "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def build_zero_strategy(
    cfg: ShardspeedConfig,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    topology: Topology,
    precision: Precision,
    timers: Any = None,
    norm_scope: NormScope = NormScope(),
    pipeline: bool = False,
) -> ZeroStrategy:
    """`norm_scope`: how the gradient norm spans a model replica split over ranks (pipeline, tensor
    parallel); `pipeline`: the module is one stage of a pipeline."""
    zero = cfg.zero_optimization
    check_zero_config(cfg, module, norm_scope, pipeline, optimizer is not None)
    if optimizer is not None and zero.stage > 0:
        check_partitionable(optimizer, cfg.zero_allow_untested_optimizer)
    comm = param_group_comm(topology, optimizer, cfg.use_data_before_expert_parallelism)
    reduce = ReduceOptions(_COMM_DTYPES[cfg.communication_data_type] if cfg.communication_data_type else None,
                           cfg.gradient_predivide_factor if cfg.prescale_gradients else None)
    offload = _optimizer_offload(cfg, optimizer, timers) if optimizer is not None else None
    if zero.stage == 3:
        return Stage3Optimizer(module, optimizer, zero, precision, comm, reduce, offload=offload, aio=cfg.aio)
    if optimizer is None:
        return ModuleOnly(module, comm.data)
    if zero.stage in (1, 2):
        return PartitionedOptimizer(module, optimizer, zero, precision, comm, reduce, offload=offload, norm_scope=norm_scope)
    return ReplicatedOptimizer(module, optimizer, zero, precision, comm, reduce, norm_scope=norm_scope)


def param_group_comm(topology: Topology, optimizer: torch.optim.Optimizer | None,
                     data_before_expert: bool = False) -> ParamGroupComm:
    """Data parallel for every param group, except DeepSpeed's MoE groups (`"moe": True`, named
    `ep_size_<n>`): those reduce over their expert-data-parallel group and complete their norm over
    their expert-parallel group."""
    data = topology.axis(Axis.DATA)
    groups = optimizer.param_groups if optimizer is not None else []
    if not any(group.get("moe", False) for group in groups):
        return ParamGroupComm(data)
    per_group: list[AxisGroup | None] = []
    extra: list[AxisGroup | None] = []
    for g, group in enumerate(groups):
        if not group.get("moe", False):
            per_group.append(None)
            extra.append(None)
            continue
        ep_axis, edp_axis = topology.expert_axes(moe_group_ep_size(group, g), data_before_expert)
        per_group.append(edp_axis)
        extra.append(ep_axis)
    return ParamGroupComm(data, tuple(per_group), tuple(extra))


def moe_group_ep_size(group: dict[str, Any], index: int) -> int:
    """The expert-parallel size of an MoE param group, from its DeepSpeed name `ep_size_<n>`."""
    name = str(group.get("name", ""))
    prefix = "ep_size_"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        raise ConfigError(f"optimizer param group {index} is marked \"moe\": True but is named {name!r}; MoE groups are "
                          "named \"ep_size_<n>\" after their layers' expert_group_name (build them with "
                          "shardspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer)")
    return int(name[len(prefix):])


def check_zero_config(cfg: ShardspeedConfig, module: torch.nn.Module, norm_scope: NormScope, pipeline: bool,
                      has_optimizer: bool = True) -> None:
    """Combinations of the ZeRO stage with the rest of the job that shardspeed refuses, naming the keys."""
    zero = cfg.zero_optimization
    _check_param_offload(cfg, has_optimizer)
    if zero.stage < 3 and any(is_partitioned(p) for p in module.parameters()):
        raise ConfigError(f"the model was built under shardspeed.zero.Init (its parameters are partitioned) but "
                          f"`zero_optimization.stage` is {zero.stage}; set it to 3")
    if pipeline and zero.stage >= 2:
        raise ConfigError(f"`zero_optimization.stage` is {zero.stage}, but pipeline parallelism works with ZeRO stages 0 and 1 "
                          "only (as in DeepSpeed: stage 2 would reduce gradients every micro batch, stage 3 would gather "
                          "each stage's parameters); set `zero_optimization.stage` to 0 or 1")
    if zero.stage == 3 and norm_scope.spans_ranks:
        raise ConfigError(stage3_with_model_parallel())
    section = zero.offload_optimizer
    if zero.stage == 0 and section is not None and section.device != "none":
        raise ConfigError("`zero_optimization.offload_optimizer` needs ZeRO stage 1, 2 or 3 (it offloads the partitioned "
                          "optimizer states); set `zero_optimization.stage` to 1 or higher, or offload_optimizer.device to \"none\"")


def _check_param_offload(cfg: ShardspeedConfig, has_optimizer: bool = True) -> None:
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
        # Only an engine that steps needs the optimizer offloaded (ZeRO-Inference streams weights alone).
        if (optimizer_section is None or optimizer_section.device == "none") and (cfg.optimizer is not None or has_optimizer):
            raise ConfigError("`zero_optimization.offload_param.device` \"nvme\" needs the optimizer offloaded too: set "
                              "`zero_optimization.offload_optimizer.device` to \"cpu\" or \"nvme\"")


def _optimizer_offload(cfg: ShardspeedConfig, optimizer: torch.optim.Optimizer, timers: Any) -> Offload | None:
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
    from ..offload.cpu_optimizers import DeepSpeedCPUAdagrad, DeepSpeedCPUAdam, FusedAdam
    from ..optim.factory import AdamNoBiasCorrection
    from ..optim.lion import Lion

    o = torch.optim
    return (DeepSpeedCPUAdam, DeepSpeedCPUAdagrad, FusedAdam, o.Adam, o.AdamW, o.SGD, o.Adagrad, o.RMSprop, o.Adamax, o.NAdam,
            o.RAdam, o.Adadelta, Lion, AdamNoBiasCorrection)


def check_partitionable(optimizer: torch.optim.Optimizer, allowed: bool) -> None:
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
