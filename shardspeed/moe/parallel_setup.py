"""What `initialize` does for a model with `MoE` layers: expert groups, expert marks, optimizer groups.

Order (all before the module is placed and the optimizer built): check the config's MoE keys
against the layers -> make each layer's expert-parallel and expert-data-parallel groups from the
engine's topology and hand them to the layer -> mark each expert parameter with its global expert
index (checkpoint names) -> make the MoE block a stage-3 leaf (its experts are gathered together,
before routing decides which of them run) -> split the optimizer's parameters into dense and
`ep_size_<n>` groups, or check a client optimizer's groups.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..comm import expert_groups
from ..comm.topology import AxisGroup, Topology
from ..config.errors import ConfigError
from ..config.schema import ShardspeedConfig
from .utils import is_moe_param


def moe_layers(module: torch.nn.Module) -> list[Any]:
    """Every shardspeed `MoE` layer of `module`, in registration order."""
    from .layer import MoE

    return [m for m in module.modules() if isinstance(m, MoE)]


def check_moe_config(cfg: ShardspeedConfig, layers: list[Any]) -> None:
    """The guide's `moe_expert_parallel_size` and `moe.ep_size` keys (not DeepSpeed's: DeepSpeed ignores them)
    must agree with the layers' own `ep_size`, which is what decides the layout."""
    sizes = sorted({layer.ep_size for layer in layers})
    written = []
    if "moe_expert_parallel_size" in cfg.model_fields_set:
        written.append(("moe_expert_parallel_size", cfg.moe_expert_parallel_size))
    if "ep_size" in cfg.moe.model_fields_set:
        written.append(("moe.ep_size", cfg.moe.ep_size))
    if cfg.moe.enabled and not layers:
        raise ConfigError("`moe.enabled` is true but the model has no shardspeed.moe.layer.MoE layer; build the model "
                          "with MoE(...) layers or remove the `moe` section")
    for key, value in written:
        if not layers and value > 1:
            raise ConfigError(f"`{key}` is {value} but the model has no shardspeed.moe.layer.MoE layer; remove the key")
        if layers and any(size != value for size in sizes):
            raise ConfigError(f"`{key}` is {value} but the model's MoE layers have ep_size {', '.join(map(str, sizes))}; "
                              "the layers' MoE(..., ep_size=) decides expert parallelism: make the key agree or remove it")


def setup_expert_parallel(layers: list[Any], topology: Topology, data_before_expert: bool = False) -> None:
    """Give every layer its expert groups (collective), mark its experts and make it a stage-3 leaf."""
    dp = topology.size("data")
    for layer in layers:
        if dp % layer.ep_size:
            raise ConfigError(f"an MoE layer has ep_size {layer.ep_size}, which does not divide the data-parallel size {dp} "
                              f"(world {topology.grid.world_size()}); choose an ep_size that divides it")
        name = expert_groups.register(topology, layer.ep_size, data_before_expert)
        gate = layer.deepspeed_moe
        if getattr(gate, "ep_group", None) is None:
            layer.set_deepspeed_parallelism(data_before_expert)
        ep_rank = expert_groups.expert_parallel(name).rank
        local = layer.num_local_experts
        for i, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            for p in expert.parameters():
                p.expert_index = (i, ep_rank * local + i)  # read by zero.param_names
        layer._z3_leaf = True  # DeepSpeed's leaf mark: the whole block is one stage-3 fetch


def expert_data_axis(param: torch.Tensor) -> AxisGroup | None:
    """The expert-data-parallel group an expert parameter is replicated over (None: a dense parameter)."""
    if not is_moe_param(param):
        return None
    return expert_groups.expert_data_parallel(str(getattr(param, "group_name")))


def moe_param_groups(model_parameters: Any, module: torch.nn.Module, layers: list[Any]) -> list[dict[str, Any]]:
    """The optimizer's param groups for a model with MoE layers: the given groups (or one group of the given
    parameters) with expert parameters moved to `ep_size_<n>` groups marked `"moe": True`."""
    from .utils import configure_moe_param_groups

    given: list[Any] = list(model_parameters) if model_parameters is not None else [p for p in module.parameters() if p.requires_grad]
    check_no_duplicates(given, module)
    if any(isinstance(g, dict) and g.get("moe", False) for g in given):
        check_moe_groups(given, module, layers)
        return given
    return configure_moe_param_groups(given)


def check_no_duplicates(given: list[Any], module: torch.nn.Module) -> None:
    names: dict[torch.Tensor, str] = {p: n for n, p in module.named_parameters()}
    seen: dict[torch.Tensor, int] = {}
    for g, group in enumerate(given):
        for p in _params_of(group):
            if p in seen and seen[p] != g:
                raise ConfigError(f"parameter `{names.get(p, '?')}` is in optimizer param groups {seen[p]} and {g}; every "
                                  "parameter must be in one group. For MoE models build the groups with "
                                  "shardspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer(groups) "
                                  "(the guide's create_moe_param_groups adds expert weights twice: named_modules() also "
                                  "visits the experts' own Linear layers)")
            seen[p] = g


def check_moe_groups(param_groups: Iterable[Any], module: torch.nn.Module, layers: list[Any]) -> None:
    """A client optimizer's (or given) groups: experts split over ranks must sit in MoE groups, and MoE groups
    must hold experts only."""
    groups_list = list(param_groups)
    names: dict[torch.Tensor, str] = {p: n for n, p in module.named_parameters()}
    split = any(layer.ep_size > 1 for layer in layers)
    has_moe_group = any(isinstance(g, dict) and g.get("moe", False) for g in groups_list)
    for g, group in enumerate(groups_list):
        moe = isinstance(group, dict) and group.get("moe", False)
        for p in _params_of(group):
            if moe and not is_moe_param(p):
                raise ConfigError(f"optimizer param group {g} is marked \"moe\": True but holds the dense parameter "
                                  f"`{names.get(p, '?')}`; all params in an MoE group must be expert parameters (build "
                                  "the groups with shardspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer)")
            if moe and str(group.get("name")) != str(getattr(p, "group_name", None)):
                raise ConfigError(f"optimizer param group {g} is named {group.get('name')!r} but holds `{names.get(p, '?')}` "
                                  f"of expert group {getattr(p, 'group_name', None)!r}; an MoE group holds the experts of "
                                  "one ep_size and is named after it (ep_size_<n>)")
            if not moe and split and is_moe_param(p):
                if not has_moe_group:
                    raise ConfigError("The model has moe layers, but None of the param groups are marked as MoE. Create a "
                                      "param group with 'moe' key set to True before creating optimizer (for example with "
                                      "shardspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer); "
                                      f"expert parameter `{names.get(p, '?')}` is in group {g}")
                raise ConfigError(f"expert parameter `{names.get(p, '?')}` is in optimizer param group {g}, which is not "
                                  "marked \"moe\": True; its gradients would be averaged with other ranks' experts")


def _params_of(group: Any) -> list[torch.Tensor]:
    if isinstance(group, dict):
        params = group.get("params", [])
        return [params] if isinstance(params, torch.Tensor) else list(params)
    return [group]


def regroup_client_optimizer(optimizer: torch.optim.Optimizer, lr_scheduler: Any = None) -> None:
    """Move split experts of a client optimizer's groups into `ep_size_<n>` MoE groups (each copying its
    source group's settings), for models whose experts `initialize` itself split (`expert_parallel`):
    the optimizer was built (by the Trainer, accelerate or the user) before the experts existed as
    such. A torch LR scheduler given with it gets each new group's base lr (and lambda) from its source."""
    if optimizer.state:
        raise ConfigError("`expert_parallel` splits the experts of the model, but the optimizer passed to initialize has "
                          "already stepped; pass a fresh optimizer")
    source: dict[str, int] = {}
    groups_in = []
    for i, group in enumerate(optimizer.param_groups):
        named = {**group, "name": group.get("name", f"group_{i}")}
        source[named["name"]] = i
        groups_in.append(named)
    from .utils import split_params_into_different_moe_groups_for_optimizer

    split = split_params_into_different_moe_groups_for_optimizer(groups_in)
    dense, moe = split[:len(groups_in)], [g for g in split[len(groups_in):] if g["params"]]
    if not moe:
        return
    origin = []
    for group in moe:
        # the source group is the dense group whose settings the MoE group copied (all but params/name/moe)
        keys = [k for k in group if k not in ("params", "name", "moe")]
        match = next(i for i, d in enumerate(dense) if all(d.get(k) is group[k] or d.get(k) == group[k] for k in keys))
        origin.append(match)
    for original, new in zip(optimizer.param_groups, dense):
        original["params"] = new["params"]
    for group in moe:
        optimizer.param_groups.append(group)
    if lr_scheduler is not None:
        for attr in ("base_lrs", "lr_lambdas", "_last_lr"):
            values = getattr(lr_scheduler, attr, None)
            if isinstance(values, list) and len(values) == len(dense):
                values.extend(values[i] for i in origin)
