"""A layout-free view of optimizer-side state, so a checkpoint loads at any world size and stage.

Each strategy saves what its rank holds ("replicated": whole tensors per parameter, written by
rank 0; "partitioned": flat partitions plus the slot table of their group; "param_shards":
stage 3's per-parameter shards, laid end to end per unit). `merge_shards` turns
the shards of all saved ranks back into one dict per parameter name:

    {"params": {name: {"fp32": tensor, "state": {"exp_avg": tensor, "step": ...}}},
     "hyperparams": [per-group lr, betas, ...], "loss_scaler": {...}}

which every strategy can load by keeping the pieces it owns. Elementwise optimizer states
(tensors shaped like the parameter) are sliced; anything else (step counters) is copied.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .param_names import parse_rows


def snapshot_state(state: dict[str, Any]) -> dict[str, Any]:
    """A detached copy of one parameter's optimizer state (tensors cloned, scalars kept)."""
    return {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in state.items()}


def shard_header(optimizer: torch.optim.Optimizer, loss_scaler: Any, fmt: str) -> dict[str, Any]:
    """What every shard carries besides tensors: its format, per-group hyperparameters, the loss scale."""
    return {
        "format": fmt,
        "hyperparams": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "loss_scaler": loss_scaler.state_dict(),
    }


def merge_shards(shards: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """One universal state from every rank's shard; None marks a rank that saved no optimizer state."""
    saved = [s for s in shards if s is not None]
    if not saved:
        raise ValueError("no optimizer state in the checkpoint")
    if saved[0]["format"] == "replicated":
        # Data-parallel rank 0 saved every dense parameter; experts split over expert-parallel ranks come
        # from the first rank of each expert-data group, under their global names.
        params = {name: entry for shard in saved for name, entry in shard["params"].items()}
        return {**saved[0], "params": params}
    if saved[0]["format"] == "param_shards":
        return _merge_param_shards(saved)
    merged: dict[str, Any] = {"params": {}, "hyperparams": saved[0]["hyperparams"], "loss_scaler": saved[0]["loss_scaler"]}
    # A group's partitions are joined per flat layout: expert groups are partitioned over their expert-data
    # group, and each expert-parallel rank's layout holds other experts (other slot names).
    layouts: dict[tuple[int, tuple[str, ...]], list[dict[str, Any]]] = {}
    for shard in saved:
        for g, part in enumerate(shard["groups"]):
            layouts.setdefault((g, tuple(slot[0] for slot in part["slots"])), []).append(part)
    for (g, _), found in layouts.items():
        group = found[0]
        parts = sorted(found, key=lambda part: part["partition"][0])
        if sum(p["master"].numel() for p in parts) != group["padded_numel"]:
            raise ValueError(f"optimizer param group {g}: the checkpoint's partitions cover "
                             f"{sum(p['master'].numel() for p in parts)} of {group['padded_numel']} elements (a rank file is missing)")
        master = torch.cat([p["master"].float() for p in parts])
        states = {}
        for key, value in group["state"].items():
            if torch.is_tensor(value) and value.dim() > 0 and value.numel() == group["master"].numel():
                states[key] = torch.cat([p["state"][key] for p in parts])
            else:
                states[key] = value
        for name, offset, numel, shape in group["slots"]:
            merged["params"][name] = {
                "fp32": master[offset:offset + numel].view(shape).clone(),
                "state": {k: (v[offset:offset + numel].view(shape).clone() if k in states and torch.is_tensor(v)
                              and v.dim() > 0 and v.numel() == master.numel() else v) for k, v in states.items()},
            }
    return merged


def _merge_param_shards(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Stage 3: each unit's shards, one per rank of the group it was partitioned over (data parallel; an
    expert unit: its expert-data group), are joined into whole values per parameter."""
    shards = sorted(shards, key=lambda s: s["rank"])
    if len(shards) != shards[0]["world"]:
        raise ValueError(f"stage-3 checkpoint has {len(shards)} rank shards but was saved by {shards[0]['world']} ranks")
    merged: dict[str, Any] = {"params": {}, "hyperparams": shards[0]["hyperparams"], "loss_scaler": shards[0]["loss_scaler"]}
    found: dict[tuple[str, ...], dict[int, dict[str, Any]]] = {}
    for s in shards:
        for u, unit in enumerate(s["units"]):
            # Checkpoints written before units recorded their group were partitioned over data parallel.
            found.setdefault(tuple(slot[0] for slot in unit["slots"]), {})[unit.get("axis_rank", s["rank"])] = unit
    for names, by_rank in found.items():
        unit = next(iter(by_rank.values()))
        expected = unit.get("axis_size", shards[0]["world"])
        if sorted(by_rank) != list(range(expected)):
            raise ValueError(f"stage-3 checkpoint: the shards of `{names[0]}` come from ranks {sorted(by_rank)} of a group of {expected}")
        parts = [by_rank[r] for r in range(expected)]
        size = unit["master"].numel()
        for name, numel, shape, offset, shard in unit["slots"]:
            def whole(pieces: list[torch.Tensor]) -> torch.Tensor:
                return torch.cat([piece[offset:offset + shard] for piece in pieces])[:numel].view(shape).clone()

            states = {}
            for key, value in unit["state"].items():
                if torch.is_tensor(value) and value.dim() > 0 and value.numel() == size:
                    states[key] = whole([part["state"][key] for part in parts])
                else:
                    states[key] = value
            merged["params"][name] = {"fp32": whole([part["master"].float() for part in parts]), "state": states}
    return merged


def restore_hyperparams(optimizer: torch.optim.Optimizer, saved: list[dict[str, Any]] | None) -> None:
    """Put saved per-group hyperparameters (lr, betas, ...) back. A group's identity (`name`, `moe`) stays
    this optimizer's. Where the group structure differs (experts split into `ep_size_<n>` groups on one
    side only), each group takes the saved group of its name, else the first saved group of its kind."""
    if not saved:
        return
    keep = ("params", "name", "moe")
    if len(saved) == len(optimizer.param_groups):
        pairs = list(zip(optimizer.param_groups, saved))
    else:
        by_name = {s.get("name"): s for s in saved if s.get("name") is not None}
        pairs = []
        for group in optimizer.param_groups:
            source = by_name.get(group.get("name")) or next(
                (s for s in saved if bool(s.get("moe", False)) == bool(group.get("moe", False))), None)
            if source is None:
                raise ValueError(f"checkpoint has {len(saved)} optimizer param groups, this optimizer has "
                                 f"{len(optimizer.param_groups)}, and none matches group {group.get('name')!r}")
            pairs.append((group, source))
    for group, values in pairs:
        group.update({k: v for k, v in values.items() if k not in keep})


def reslice_rows(params: dict[str, Any], wanted: dict[str, tuple[str, int, int, int] | None]) -> dict[str, Any]:
    """Per-parameter entries (`{"fp32", "state"}`) with every wanted fused-experts weight present, cut from the
    saved slices of the same weight joined by rows, whatever expert-parallel size saved them. `wanted`: each
    checkpoint name the model needs -> (base name, start, stop, total rows) for a slice it holds, or None
    for a weight it holds whole (which a run with split experts saved in slices)."""
    saved: dict[str, list[tuple[int, int, dict[str, Any]]]] = {}
    for name, entry in params.items():
        parsed = parse_rows(name)
        if parsed is not None:
            saved.setdefault(parsed[0], []).append((parsed[1], parsed[2], entry))
    missing: dict[str, tuple[str, int, int, int]] = {}
    for name, rows in wanted.items():
        if name in params:
            continue
        if rows is not None:
            missing[name] = rows
        elif name in saved:
            total = max(stop for _, stop, _ in saved[name])
            missing[name] = (name, 0, total, total)
    if not missing:
        return params
    out = dict(params)
    for name, (base, start, stop, total) in missing.items():
        pieces = sorted(saved.get(base, []), key=lambda piece: piece[0])
        if not pieces and base in params:  # saved whole (expert-parallel size 1)
            pieces = [(0, total, params[base])]
        bounds = [(a, b) for a, b, _ in pieces]
        if not pieces or bounds[0][0] != 0 or bounds[-1][1] != total or any(b != c for (_, b), (c, _) in zip(bounds, bounds[1:])):
            raise KeyError(f"checkpoint has no optimizer state for `{base}` rows {start}:{stop} of {total} (saved rows: {bounds})")
        whole = torch.cat([entry["fp32"] for _, _, entry in pieces])
        state = {}
        for key, value in pieces[0][2]["state"].items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[1:] == whole.shape[1:]:
                state[key] = torch.cat([entry["state"][key] for _, _, entry in pieces])[start:stop].clone()
            else:
                state[key] = value
        out[name] = {"fp32": whole[start:stop].clone(), "state": state}
    return out


__all__ = ["merge_shards", "reslice_rows", "restore_hyperparams", "shard_header", "snapshot_state"]
