"""Whole weights of a stage-3 model: gathered into a state dict, or loaded into every rank's shards."""
from __future__ import annotations

import torch

from .param_shards import Unit, is_partitioned


def consolidated_state_dict(module: torch.nn.Module, units: list[Unit], keep: bool,
                            exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
    """`module`'s full state dict, gathered unit by unit (a collective: every rank must call it); only
    ranks with `keep` receive it, the others get {}. Units gathered before stay gathered."""
    whole: dict[int, torch.Tensor] = {}
    for unit in units:
        was_gathered = unit.full is not None
        unit.gather()
        if keep:
            for p in unit.params:
                whole[id(p)] = p.data.detach().to("cpu", copy=True)
        if not was_gathered:
            unit.release()
    if not keep:
        return {}
    frozen = {id(p) for p in module.parameters() if not p.requires_grad} if exclude_frozen else set()
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in frozen:
            continue
        out[name] = whole[id(tensor)] if id(tensor) in whole else tensor.detach().to("cpu", copy=True)
    return out


def load_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> list[Unit]:
    """Whole values (the same on every rank) into the shards of `module`'s partitioned parameters and into
    its other tensors; returns the units whose shards changed."""
    own = module.state_dict(keep_vars=True)
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise RuntimeError(f"error loading the module state dict: missing keys {missing}, unexpected keys {unexpected}")
    touched: dict[Unit, None] = {}
    with torch.no_grad():
        for name, tensor in own.items():
            if name not in state:
                continue
            if is_partitioned(tensor):
                tensor.ds_unit.load_whole(tensor, state[name])
                touched[tensor.ds_unit] = None
            else:
                tensor.copy_(state[name])
    return list(touched)
