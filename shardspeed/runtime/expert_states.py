"""Module weights of a model whose experts are split over expert-parallel ranks, as checkpoints hold them.

A checkpoint's module file holds every expert under its global index (DeepSpeed's own files do
the same, one per global expert), so it loads at any expert-parallel size: saving collects each
expert-parallel group's experts on its ranks (an object all-gather per expert group, collective),
loading keeps the experts this rank holds and renames them to its local indices.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist

from ..comm import expert_groups
from ..zero.param_names import ROWS, fused_expert_rows, global_name, is_expert, local_to_global_keys

_EXPERT_KEY = re.compile(r"(^|\.)deepspeed_experts\.\d+\.")


def _expert_group_names(module: torch.nn.Module) -> list[str]:
    return sorted({str(getattr(p, "group_name")) for p in module.parameters() if is_expert(p) and hasattr(p, "group_name")})


def with_all_experts(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (this rank's module state dict, or {} on a rank that keeps none) with its experts under their
    global names and, where it holds experts, those of the rest of its expert-parallel groups too (fused
    experts: whole weights, their rows joined). Every rank must call it (an all-gather per expert group)."""
    fused = _fused(module)
    rename = {k: v for k, v in local_to_global_keys(module).items() if k not in fused}
    # Decided by what every rank has alike (expert groups), never by this rank's renames: expert-parallel
    # rank 0's local indices are already the global ones, and it must still join the all-gather.
    if not _expert_group_names(module):
        return state
    group_of = {name: str(getattr(p, "group_name")) for name, p in module.named_parameters(remove_duplicate=False)
                if is_expert(p) and hasattr(p, "group_name")}
    out = {rename.get(k, k): v for k, v in state.items() if k not in fused}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for group_name in _expert_group_names(module):
        axis = expert_groups.expert_parallel(group_name)
        mine = {rename.get(k, k): v.detach().cpu() for k, v in state.items()
                if group_of.get(k) == group_name and k not in fused}
        mine.update({f"{k}{ROWS}{fused[k][0]}": v.detach().cpu() for k, v in state.items()
                     if k in fused and group_of.get(k) == group_name})
        gathered: list[Any] = [mine] if axis.size == 1 else [None] * axis.size
        if axis.size > 1:
            dist.all_gather_object(gathered, mine, group=axis.group)
        if not state:
            continue
        for part in gathered:
            for key, value in part.items():
                base, sep, start = key.partition(ROWS)
                if sep:
                    pieces.setdefault(base, []).append((int(start), value))
                else:
                    out[key] = value
    for base, rows in pieces.items():
        out[base] = torch.cat([value for _, value in sorted(rows, key=lambda r: r[0])])
    return out


def _fused(module: torch.nn.Module) -> dict[str, tuple[int, int, int]]:
    """Module names of fused-experts slices -> (start, stop, total rows)."""
    return {base: (start, stop, total) for base, start, stop, total in fused_expert_rows(module).values()}


def to_local_experts(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's module state (experts under global names) as this rank's module names it: its own
    experts renamed to their local indices, the other ranks' experts left out."""
    fused = _fused(module)
    mine = {global_name(n, p): n for n, p in module.named_parameters(remove_duplicate=False) if is_expert(p) and n not in fused}
    if not mine and not fused:
        return state
    out = {}
    for key, value in state.items():
        if key in fused:
            start, stop, total = fused[key]
            if value.shape[0] != total:
                raise ValueError(f"checkpoint weight `{key}` has {value.shape[0]} expert rows, the model {total}")
            out[key] = value[start:stop]
        elif key in mine:
            out[mine[key]] = value
        elif not _EXPERT_KEY.search(key) or not _is_split_expert_key(key, mine):
            out[key] = value
    return out


def _is_split_expert_key(key: str, mine: dict[str, str]) -> bool:
    """An expert key of one of this model's MoE layers (the same layer prefix as some expert this rank holds)."""
    match = _EXPERT_KEY.search(key)
    assert match is not None
    head = key[:match.end() - len(match.group(0).lstrip("."))]  # the layer's path up to `deepspeed_experts.`
    return any(k.startswith(head + "deepspeed_experts.") for k in mine)
