"""`shardspeed.initialize` (DeepSpeed's entry point, with its signature and return values), `tp_model_init`
and `add_config_arguments`: the top of the package, above the engine and the pipeline engine.

Order of work: config parsed strictly (a misspelt key fails before anything else happens) ->
distributed set-up -> the layout's sizes -> config completed ("auto" resolved against the model and
the data-parallel size) -> topology (AutoTP shards the model here) -> module placed, cast and made
identical on every rank -> optimizer -> engine with its ZeRO strategy -> LR schedule -> dataloader.
Parallelism is applied as module transforms in this order: tensor parallel, then ZeRO.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from .accelerator import get_accelerator
from .comm.init import init_distributed
from .comm.topology import Axis, Topology
from .config import ConfigError, ResolveContext, complete_config, parse_strict
from .config.schema import ShardspeedConfig
from .moe.hf_expert_parallel import apply_expert_parallel
from .moe.parallel_setup import (check_moe_config, check_moe_groups, expert_data_axis, moe_layers, moe_param_groups,
                                  regroup_client_optimizer, setup_expert_parallel)
from .inference.zero_inference import sync_generate_across_ranks
from .monitor.logs import speak_on_rank0
from .optim import build_optimizer
from .optim.loss_scaler import make_loss_scaler
from .pipe import PipelineEngine, PipelineModule
from .profiling.planner.auto import zero_planner
from .runtime.dataloader import ShardspeedDataLoader
from .runtime.engine import ShardspeedEngine
from .runtime.hybrid_engine import DeepSpeedHybridEngine
from .runtime.lr_schedules import build_lr_scheduler
from .tensor_parallel import auto_tp
from .zero.factory import stage3_with_model_parallel
from .zero.param_shards import is_partitioned

logger = logging.getLogger("shardspeed")


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    model_parameters: Any = None,
    training_data: torch.utils.data.Dataset | None = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable[..., Any] | None = None,
    config: dict[str, Any] | str | os.PathLike[str] | None = None,
    mesh_param: Any = None,
    config_params: dict[str, Any] | str | None = None,
) -> tuple[ShardspeedEngine, torch.optim.Optimizer | None, ShardspeedDataLoader | None, Any]:
    """Wrap `model` for training; returns (engine, optimizer, training_dataloader, lr_scheduler)."""
    if model is None:
        raise ValueError("shardspeed.initialize needs model=")
    if mesh_param is not None:
        raise NotImplementedError("initialize(mesh_param=...) (sequence-parallel meshes) is not supported yet by shardspeed")
    parsed = parse_strict(_pick_config(args, config, config_params))
    _check_supported(parsed.cfg)
    init_distributed(distributed_port=distributed_port, dist_init_required=None if not dist.is_initialized() else dist_init_required)
    speak_on_rank0(dist.get_rank())
    tp_size, tp_key = max(1, parsed.cfg.tensor_parallel.autotp_size), parsed.cfg.tensor_parallel.size_key
    cfg = complete_config(parsed, ResolveContext(_data_parallel_size(model, mpu, tp_size, tp_key), _model_dtype(model),
                                                 _hidden_size(model), zero_planner(model, training_data, tp_size > 1 or
                                                                                   isinstance(model, PipelineModule))))
    if tp_size > 1 and cfg.zero_optimization.stage == 3:
        raise ConfigError(stage3_with_model_parallel(tp_key))  # before AutoTP shards the model
    topology = _topology(model, mpu, tp_size, tp_key)
    pipeline = isinstance(model, PipelineModule)
    experts = moe_layers(model)
    check_moe_config(cfg, experts)
    if experts:
        _check_moe_layout(model, cfg, experts, optimizer, pipeline)
        setup_expert_parallel(experts, topology, cfg.use_data_before_expert_parallelism)
    if cfg.expert_parallel.enabled:  # Hugging Face MoE blocks (DeepSpeed's AutoEP): split their fused experts
        if experts:
            raise ConfigError("`expert_parallel.enabled` splits Hugging Face MoE blocks, but the model has shardspeed MoE "
                              "layers, which split themselves (MoE(..., ep_size=)); remove the `expert_parallel` section")
        _check_moe_layout(model, cfg, [], optimizer, pipeline)
        apply_expert_parallel(model, cfg.expert_parallel, topology, cfg.use_data_before_expert_parallelism)
    if cfg.log_level:
        logger.setLevel(cfg.log_level.upper())
    if cfg.dump_state and dist.get_rank() == 0:
        logger.info("shardspeed config: %s", cfg.model_dump_json(indent=1))

    model = _place_module(model, cfg, topology)
    base_optimizer = _make_optimizer(optimizer, model_parameters, model, cfg, experts)
    if cfg.expert_parallel.enabled and isinstance(optimizer, torch.optim.Optimizer):
        regroup_client_optimizer(optimizer, lr_scheduler)  # built before initialize split the experts
    dataloader = None
    if training_data is not None:
        dp = topology.axis(Axis.DATA)
        assert cfg.train_micro_batch_size_per_gpu is not None  # complete_config filled in the batch sizes
        dataloader = ShardspeedDataLoader(training_data, cfg.train_micro_batch_size_per_gpu, dp.rank, dp.size,
                                          collate_fn=collate_fn, drop_last=cfg.dataloader_drop_last)
    engine_class: type[ShardspeedEngine] = PipelineEngine if pipeline else ShardspeedEngine  # Pipeline: model is a PipelineModule
    if cfg.hybrid_engine.enabled:
        if pipeline:
            raise ConfigError("`hybrid_engine.enabled` with a PipelineModule is not supported (as in DeepSpeed); turn one off")
        engine_class = DeepSpeedHybridEngine
    engine = engine_class(model, cfg, topology, base_optimizer, None, make_loss_scaler(cfg.fp16), dataloader,
                          parsed.raw)
    engine.lr_scheduler = _make_scheduler(lr_scheduler, engine.optimizer, cfg)
    if engine.strategy.partitions_parameters and dist.get_world_size() > 1:
        sync_generate_across_ranks(model)  # ZeRO-Inference: every forward gathers, so ranks generate in step
    return engine, engine.optimizer, dataloader, engine.lr_scheduler


def _data_parallel_size(model: torch.nn.Module, mpu: Any, tp_size: int, tp_key: str) -> int:
    """The data-parallel size the layout will have, known before any group is made or the model is sharded."""
    if isinstance(model, PipelineModule):
        return model.comm_topology.axis(Axis.DATA).size
    if mpu is not None and callable(getattr(mpu, "get_data_parallel_group", None)):
        return dist.get_world_size(mpu.get_data_parallel_group())
    prepared = getattr(model, "shardspeed_topology", None)  # set by shardspeed.tp_model_init
    if prepared is not None:
        return prepared.axis(Axis.DATA).size
    world = dist.get_world_size()
    if world % tp_size:
        raise ConfigError(f"`{tp_key}` {tp_size} must divide the world size {world}")
    return world // tp_size


def _topology(model: torch.nn.Module, mpu: Any, tp_size: int, tp_key: str) -> Topology:
    """The parallel axes: a PipelineModule's own, an mpu's groups, a `tp_model_init` model's, AutoTP's, or data parallel.

    AutoTP shards the model here (collective), before it is cast and placed.
    """
    if isinstance(model, PipelineModule):
        if mpu is not None or tp_size > 1:
            raise ConfigError("a PipelineModule carries its own topology: tensor parallelism inside pipeline stages "
                              f"(mpu= or `{tp_key}`) is not supported yet by shardspeed")
        return model.comm_topology
    if mpu is not None:  # the model is sharded already; a tensor_parallel size in the config only describes it
        topology = Topology.from_mpu(mpu)
        if tp_size > 1 and tp_size != topology.axis(Axis.TENSOR).size:
            raise ConfigError(f"`{tp_key}` is {tp_size} but the mpu's tensor-parallel group has "
                              f"{topology.axis(Axis.TENSOR).size} ranks; make them agree or remove the key")
        return topology
    prepared = getattr(model, "shardspeed_topology", None)  # set by shardspeed.tp_model_init
    if prepared is not None:
        if tp_size > 1 and tp_size != prepared.axis(Axis.TENSOR).size:
            raise ConfigError(f"`{tp_key}` is {tp_size} but tp_model_init sharded the model "
                              f"{prepared.axis(Axis.TENSOR).size} ways; make them agree")
        return prepared
    if tp_size > 1:
        topology = tensor_parallel_topology(tp_size, tp_key)
        auto_tp(model, topology.axis(Axis.TENSOR), tp_key)
        return topology
    return Topology.data_parallel()


def tensor_parallel_topology(tp_size: int, tp_key: str = "tensor_parallel.autotp_size") -> Topology:
    """data x tensor over the whole job, tensor-parallel peers adjacent (DeepSpeed's order)."""
    world = dist.get_world_size()
    if tp_size < 1 or world % tp_size:
        raise ConfigError(f"`{tp_key}` {tp_size} must divide the world size {world}")
    return Topology.build(tensor=tp_size)


def tp_model_init(model: torch.nn.Module, tp_size: int, dtype: torch.dtype | None = None, config: Any = None) -> torch.nn.Module:
    """DeepSpeed's `tp_model_init`: shard a Hugging Face GPT-2 / Llama model `tp_size` ways now (AutoTP).

    Pass the model to `initialize` afterwards; it keeps the topology made here. `config` is
    accepted for DeepSpeed's signature and unused.
    """
    init_distributed()
    topology = tensor_parallel_topology(tp_size)
    auto_tp(model, topology.axis(Axis.TENSOR))
    if dtype is not None:
        model.to(dtype)
    setattr(model, "shardspeed_topology", topology)  # not a tensor or module: read back with getattr by initialize
    return model


def _pick_config(args: Any, config: Any, config_params: Any) -> Any:
    """The config from exactly one of: config=, config_params=, args.deepspeed_config / args.shardspeed_config."""
    from_args = None
    if args is not None:
        for attr in ("deepspeed_config", "shardspeed_config", "deepscale_config"):
            value = getattr(args, attr, None)
            if value:
                from_args = value
                break
        if from_args is None and isinstance(getattr(args, "deepspeed", None), str):
            from_args = args.deepspeed
    given = [c for c in (config, config_params, from_args) if c is not None]
    if not given:
        raise ConfigError("no config: pass config= to initialize, or --deepspeed_config on the command line")
    if len(given) > 1:
        raise ConfigError(
            "more than one config given (config=, config_params= and args.deepspeed_config); pass exactly one"
        )
    return given[0]


def _model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _hidden_size(model: torch.nn.Module) -> int | None:
    hf_config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(hf_config, attr, None)
        if isinstance(value, int):
            return value
    return None


def _check_supported(cfg: ShardspeedConfig) -> None:
    """Refuse switched-on features that later versions bring, rather than ignoring them."""
    pending = {
        "tensor_parallel.tp_overlap_comm": cfg.tensor_parallel.tp_overlap_comm,
        "tensor_parallel.preset_model": cfg.tensor_parallel.preset_model is not None,
        "tensor_parallel.partition_config": cfg.tensor_parallel.partition_config is not None,
        "comet.enabled": cfg.comet.enabled,
        "torch_autocast.enabled": cfg.torch_autocast.enabled,
        "sparse_gradients": cfg.sparse_gradients,
        "checkpoint.load_universal": cfg.checkpoint.load_universal,
        "graph_harvesting": cfg.graph_harvesting,
        "zero_optimization.mics_shard_size": cfg.zero_optimization.mics_shard_size > 0,
        "zero_optimization.zeropp_loco_param": cfg.zero_optimization.zeropp_loco_param is not None,
        "zero_optimization.zero_quantized_weights": cfg.zero_optimization.zero_quantized_weights,
        "zero_optimization.zero_quantized_gradients": cfg.zero_optimization.zero_quantized_gradients,
        "zero_optimization.zero_hpz_partition_size": cfg.zero_optimization.zero_hpz_partition_size > 1,
    }
    for key, on in pending.items():
        if on:
            raise ConfigError(f"`{key}` is not supported yet by shardspeed; remove it from the config")


def _place_module(model: torch.nn.Module, cfg: ShardspeedConfig, topology: Topology) -> torch.nn.Module:
    """Move to this rank's device, cast to the training dtype, and copy rank 0's weights everywhere."""
    device = get_accelerator().device(int(os.environ.get("LOCAL_RANK", "0")))
    if any(is_partitioned(p) for p in model.parameters()):
        return _place_partitioned_module(model, device, topology)
    model.to(device)
    if cfg.fp16.enabled:
        model.half()
    elif cfg.bf16.enabled:
        model.bfloat16()
    dp = topology.axis(Axis.DATA)
    if dp.size > 1:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                # An expert split over expert-parallel ranks is replicated over its expert-data group only.
                axis = expert_data_axis(tensor) or dp
                if axis.size > 1:
                    dist.broadcast(tensor.data, src=axis.ranks[0], group=axis.group)
    return model


def _place_partitioned_module(model: torch.nn.Module, device: torch.device, topology: Topology) -> torch.nn.Module:
    """A model built under zero.Init: its parameters are already placed, cast and partitioned.

    Parameters it gained outside zero.Init are still whole; they and the buffers get rank 0's values.
    """
    dp = topology.axis(Axis.DATA)
    whole = [p for p in model.parameters() if not is_partitioned(p)]
    with torch.no_grad():
        for tensor in [*whole, *model.buffers()]:
            tensor.data = tensor.data.to(device)
            if dp.size > 1:
                dist.broadcast(tensor.data, src=dp.ranks[0], group=dp.group)
    return model


def _make_optimizer(optimizer: Any, model_parameters: Any, model: torch.nn.Module, cfg: ShardspeedConfig,
                    experts: list[Any]) -> torch.optim.Optimizer | None:
    if optimizer is not None and cfg.optimizer is not None:
        raise ConfigError("an optimizer was passed to initialize and the config has an `optimizer` section; keep one")
    if isinstance(optimizer, torch.optim.Optimizer):
        if experts:
            check_moe_groups(optimizer.param_groups, model, experts)
        return optimizer
    if experts or cfg.expert_parallel.enabled:  # DeepSpeed's automatic groups: dense ones, one `ep_size_<n>` per layout
        params: list[Any] = moe_param_groups(model_parameters, model, experts)
    else:
        params = list(model_parameters) if model_parameters is not None else [p for p in model.parameters() if p.requires_grad]
    if callable(optimizer):
        return optimizer(params)
    if cfg.optimizer is not None:
        return build_optimizer(cfg.optimizer.type, cfg.optimizer.params, params)
    return None


def _check_moe_layout(model: torch.nn.Module, cfg: ShardspeedConfig, experts: list[Any], optimizer: Any, pipeline: bool) -> None:
    """Layouts with MoE layers that shardspeed does not build yet, refused before any group is made."""
    split = [layer for layer in experts if layer.ep_size > 1] or cfg.expert_parallel.autoep_size > 1
    if pipeline:
        raise ConfigError("MoE layers (or `expert_parallel`) inside a PipelineModule are not supported yet by shardspeed; "
                          "train the MoE model without pipeline parallelism")
    if any(is_partitioned(p) for p in model.parameters()):
        raise ConfigError("an MoE model built under shardspeed.zero.Init is not supported yet: zero.Init partitions experts "
                          "over all data-parallel ranks; build the model normally and use `zero_optimization.stage` 3")
    if split and cfg.zero_optimization.stage == 3:
        frozen = [n for n, p in model.named_parameters() if getattr(p, "allreduce", True) is False and not p.requires_grad]
        if optimizer is None and cfg.optimizer is None or frozen:
            raise ConfigError("ZeRO-3 with expert parallelism (ep_size > 1) partitions experts by their optimizer group; "
                              "frozen experts or an engine without an optimizer are not supported yet"
                              + (f" (frozen: `{frozen[0]}`)" if frozen else ""))


def _make_scheduler(lr_scheduler: Any, optimizer: torch.optim.Optimizer | None, cfg: ShardspeedConfig) -> Any:
    if lr_scheduler is not None and cfg.scheduler is not None:
        raise ConfigError("an lr_scheduler was passed to initialize and the config has a `scheduler` section; keep one")
    if lr_scheduler is not None and not hasattr(lr_scheduler, "step") and callable(lr_scheduler):
        return lr_scheduler(optimizer)
    if lr_scheduler is not None:
        return lr_scheduler
    if cfg.scheduler is not None:
        if optimizer is None:
            # As DeepSpeed: no optimizer (an evaluation-only engine, e.g. the Trainer's evaluate()
            # before train() at ZeRO-3) means no schedule, whatever the config says.
            logger.info("the config's `scheduler` section is not used: this engine has no optimizer")
            return None
        return build_lr_scheduler(cfg.scheduler.type, cfg.scheduler.params, optimizer)
    return None


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's `--deepspeed` and `--deepspeed_config` (and `--shardspeed_config`)."""
    group = parser.add_argument_group("shardspeed", "shardspeed / DeepSpeed configuration")
    group.add_argument("--deepspeed", default=False, action="store_true", help="Enable shardspeed (DeepSpeed-compatible flag).")
    group.add_argument("--deepspeed_config", default=None, type=str, help="Path to the ds_config JSON file.")
    group.add_argument("--shardspeed_config", default=None, type=str, help="Same as --deepspeed_config.")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser
