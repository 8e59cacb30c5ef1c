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
        return saved[0]
    if saved[0]["format"] == "param_shards":
        return _merge_param_shards(saved)
    merged: dict[str, Any] = {"params": {}, "hyperparams": saved[0]["hyperparams"], "loss_scaler": saved[0]["loss_scaler"]}
    for g, group in enumerate(saved[0]["groups"]):
        parts = sorted((s["groups"][g] for s in saved), key=lambda part: part["partition"][0])
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
    """Stage 3: rank r holds shard r of every parameter (padded flat tensor cut in world pieces)."""
    shards = sorted(shards, key=lambda s: s["rank"])
    if len(shards) != shards[0]["world"]:
        raise ValueError(f"stage-3 checkpoint has {len(shards)} rank shards but was saved by {shards[0]['world']} ranks")
    merged: dict[str, Any] = {"params": {}, "hyperparams": shards[0]["hyperparams"], "loss_scaler": shards[0]["loss_scaler"]}
    for u, unit in enumerate(shards[0]["units"]):
        parts = [s["units"][u] for s in shards]
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
    """Put saved per-group hyperparameters (lr, betas, ...) back; the group structure must match."""
    if not saved:
        return
    if len(saved) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(saved)} optimizer param groups, this optimizer has {len(optimizer.param_groups)}")
    for group, values in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in values.items() if k != "params"})
