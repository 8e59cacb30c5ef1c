"""Stage-3 optimizer state in checkpoints: per unit, this rank's fp32 master shard and optimizer states.

The strategy steps one tensor per run of units (or offloads per group), but a checkpoint keeps the
per-unit layout (`"param_shards"`, see `universal`): it loads at any world size and stage.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .param_shards import Unit, shard_of
from .universal import restore_hyperparams, snapshot_state

if TYPE_CHECKING:
    from .stage3 import Stage3Optimizer


def _per_element(value: Any, numel: int) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.numel() == numel


def _located(strategy: "Stage3Optimizer") -> dict[Unit, tuple[torch.Tensor, dict[str, Any], int]]:
    """Each trainable unit's (stepped fp32 tensor, its optimizer state, the unit's offset in it)."""
    out: dict[Unit, tuple[torch.Tensor, dict[str, Any], int]] = {}
    if strategy.offload is None:
        assert strategy.optimizer is not None
        for master, run in zip(strategy.masters, strategy.runs):
            assert master is not None
            state, at = strategy.optimizer.state.get(master, {}), 0
            for unit in run:
                out[unit] = (master.detach(), state, at)
                at += unit.partition_size
        return out
    for g, pieces in enumerate(strategy.segment_units):
        group_master, group_state = strategy.offload.group_master_and_state(g)
        at = 0
        for _, units in pieces:
            for unit in units:
                out[unit] = (group_master, group_state, at)
                at += unit.partition_size
    return out


def unit_states(strategy: "Stage3Optimizer") -> list[dict[str, Any]]:
    """Per trainable unit, in unit order: its slot table, fp32 master shard and optimizer states."""
    located = _located(strategy)
    units = []
    for unit in strategy.trainable:
        master, state, at = located[unit]
        n, total = unit.partition_size, master.numel()
        units.append({
            "slots": [(s.name, s.numel, tuple(s.shape), s.offset, s.shard) for s in unit.slots],
            "axis_rank": unit.dp.rank, "axis_size": unit.dp.size,  # experts: their expert-data group, not data parallel
            "master": master[at:at + n].detach().clone(),
            "state": snapshot_state({k: v[at:at + n] if _per_element(v, total) else v for k, v in state.items()}),
        })
    return units


def _loaded_unit(unit: Unit, params: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """This rank's fp32 master shard and optimizer-state shards of `unit`, cut from whole values."""
    rank = unit.dp.rank
    master_parts: list[torch.Tensor] = []
    pieces: dict[str, list[torch.Tensor]] = {}
    scalars: dict[str, Any] = {}
    for slot in unit.slots:
        entry = params[slot.name]
        master_parts.append(shard_of(entry["fp32"].reshape(-1).float(), slot.shard, rank))
        for key, value in entry["state"].items():
            if _per_element(value, slot.numel):
                pieces.setdefault(key, []).append(shard_of(value.reshape(-1), slot.shard, rank))
            else:
                scalars[key] = value.clone() if torch.is_tensor(value) else value
    return torch.cat(master_parts), {**scalars, **{k: torch.cat(v) for k, v in pieces.items()}}


def _joined(members: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, dict[str, Any]]:
    master = torch.cat([m for m, _ in members])
    first = members[0][1]
    state = {k: torch.cat([st[k] for m, st in members]) if _per_element(v, members[0][0].numel()) else v
             for k, v in first.items()}
    return master, state


def load_universal_units(strategy: "Stage3Optimizer", universal: dict[str, Any]) -> None:
    """Masters, optimizer states, hyperparameters and the loss scale from per-parameter values."""
    assert strategy.optimizer is not None
    loaded = {unit: _loaded_unit(unit, universal["params"]) for unit in strategy.trainable}
    with torch.no_grad():
        if strategy.offload is not None:
            for g, pieces in enumerate(strategy.segment_units):
                members = [loaded[u] for _, units in pieces for u in units]
                if members:
                    strategy.offload.load_group(g, *_joined(members))
        else:
            for i, run in enumerate(strategy.runs):
                master_values, state = _joined([loaded[u] for u in run])
                master = strategy.masters[i]
                assert master is not None
                master.copy_(master_values)
                part = strategy._param_flat(i)
                if part.dtype != torch.float32:
                    part.copy_(master_values)
                if state:
                    strategy.optimizer.state[master] = {k: v.to(master.device) if _per_element(v, master.numel()) else v
                                                        for k, v in state.items()}
    restore_hyperparams(strategy.optimizer, universal.get("hyperparams"))
    if universal.get("loss_scaler"):
        strategy.loss_scaler.load_state_dict(universal["loss_scaler"])
