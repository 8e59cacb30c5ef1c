"""DeepSpeed's `deepspeed.moe.utils`: telling expert parameters apart and building optimizer groups for them.

An expert parameter is one with `allreduce = False` (set by `Experts`); its `group_name` names the
expert-data-parallel group its gradients are averaged over. DeepSpeed's ZeRO 1/2 want expert
parameters in their own param groups marked `"moe": True` and named by that group name.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer import MoE

# DeepSpeed's default chunk size for MoE param groups, in elements.
MAX_MOE_GROUP_SIZE = 178956971


def has_moe_layers(m: nn.Module) -> tuple[bool, int]:
    """(whether `m` contains a `MoE` layer, the first such layer's `num_experts`, else 0), as DeepSpeed."""
    for module in m.modules():
        if isinstance(module, MoE):
            return True, module.num_experts
    return False, 0


def is_moe_param(param: torch.Tensor) -> bool:
    """Whether `param` is an expert parameter (it has `allreduce` and it is False)."""
    return hasattr(param, "allreduce") and not param.allreduce


def split_params_into_shared_and_expert_params(
        params: list[nn.Parameter]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared parameters, expert parameters), each in the given order."""
    shared = [p for p in params if not is_moe_param(p)]
    expert = [p for p in params if is_moe_param(p)]
    return shared, expert


def split_params_grads_into_shared_and_expert_params(
        group: list[nn.Parameter]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(gradients of shared parameters, gradients of expert parameters), each cast to its parameter's
    dtype; parameters without a gradient are skipped. Used for norms and overflow checks."""
    shared: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    for p in group:
        if p.grad is not None:
            (expert if is_moe_param(p) else shared).append(p.grad.to(p.dtype))
    return shared, expert


def _chunks(params: list[Any], max_group_size: int | float) -> list[list[Any]]:
    """Consecutive runs of `params` of at most `max_group_size` elements (`ds_numel` when partitioned).

    A parameter larger than the limit gets a chunk of its own. (DeepSpeed also emits an empty chunk
    when the very first parameter is larger than the limit; shardspeed does not.)
    """
    chunks: list[list[Any]] = []
    current: list[Any] = []
    size = 0
    for p in params:
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if current and size + numel > max_group_size:
            chunks.append(current)
            current, size = [], 0
        current.append(p)
        size += numel
    if current:
        chunks.append(current)
    return chunks


def split_params_into_different_moe_groups_for_optimizer(
        param_groups: dict[str, Any] | tuple[dict[str, Any], ...] | list[dict[str, Any]],
        max_group_size: int | float | None = MAX_MOE_GROUP_SIZE) -> list[dict[str, Any]]:
    """Move expert parameters out of `param_groups` into MoE groups, as DeepSpeed does.

    For every input group (keyed by its `"name"`) and every expert group name found among all the
    parameters, a new group copies the input group's settings with `"name"` = the expert group name
    and `"moe": True`, and takes that input group's expert parameters of that name, cut into chunks of
    at most `max_group_size` elements (chunks are skipped when empty). With `max_group_size=None` the
    groups are appended whole, empty ones included. The input groups keep their shared parameters and
    are modified in place; a list argument is extended in place and returned. Expert group names are
    taken in the order first met (DeepSpeed iterates a set, whose order can differ between processes).
    """
    if isinstance(param_groups, tuple):
        groups = list(param_groups)
    elif isinstance(param_groups, dict):
        groups = [param_groups]
    elif isinstance(param_groups, list):
        groups = param_groups
    else:
        raise ValueError(f"Unknown param group type of {type(param_groups)}")

    names = list(dict.fromkeys(p.group_name for g in groups for p in g["params"] if is_moe_param(p)))
    if names and any("name" not in g for g in groups):
        raise ValueError("split_params_into_different_moe_groups_for_optimizer: every param group needs a 'name' key")
    moe_groups: dict[str, dict[str, dict[str, Any]]] = {}
    for g in groups:
        # Input groups that share a name share their MoE groups (the later one's settings win), as in DeepSpeed.
        moe_groups[g["name"] if names else ""] = {n: {**g, "name": n, "moe": True, "params": []} for n in names}
    for g in groups:
        shared: list[Any] = []
        for p in g["params"]:
            if is_moe_param(p):
                moe_groups[g["name"]][p.group_name]["params"].append(p)
            else:
                shared.append(p)
        g["params"] = shared

    for by_name in moe_groups.values():
        for moe_group in by_name.values():
            if max_group_size is None:
                groups.append(moe_group)
            else:
                groups.extend({**moe_group, "params": chunk} for chunk in _chunks(moe_group["params"], max_group_size))
    return groups


def is_moe_param_group(param_group: dict[str, Any]) -> bool:
    """Whether an optimizer param group is an MoE group (`"moe": True`)."""
    return bool(param_group.get("moe", False))


def configure_moe_param_groups(model_parameters: list[Any]) -> list[Any]:
    """The param groups `deepspeed.initialize` builds from `model_parameters` for a model with MoE layers.

    A list of parameters becomes `{"name": "dense-params", ...}` plus the MoE groups; a list of param
    groups without any `"moe"` key is split likewise; groups that already carry `"moe"` are returned as is.
    """
    if not isinstance(model_parameters, list):
        raise TypeError(f"model_parameters must be a list, got {type(model_parameters).__name__}")
    for p in model_parameters:
        if not isinstance(p, (torch.Tensor, dict)):
            raise TypeError("param argument that would be given to the optimizer should be "
                            f"an iterable of Tensors or dicts, but got {type(p)}")
    if not model_parameters:
        raise ValueError("model_parameters is empty: the optimizer would get no parameters")
    first = model_parameters[0]
    if isinstance(first, nn.Parameter):
        return split_params_into_different_moe_groups_for_optimizer({"params": model_parameters, "name": "dense-params"})
    if isinstance(first, dict):
        if any("moe" in g for g in model_parameters):
            return model_parameters
        return split_params_into_different_moe_groups_for_optimizer(model_parameters)
    return model_parameters
