"""Tensor-parallel shards to whole tensors and back, so a checkpoint loads at another tensor-parallel size.

A sharded parameter's marks (`partition_dim`, `partition_stride`) say how it was cut: along one
dimension, in `stride` equal blocks (fused QKV: 3) each split over the ranks, or as evenly as
possible when the stride is 1 (vocabulary rows, which need not divide). A checkpoint records the
saving model's marks (`saved`: how to merge its shards); the loading model's own marks say how to
cut the whole again (`mine`; none when it is not tensor-parallel).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..comm.topology import AxisGroup
from .layers import cut, is_tensor_parallel


def merge_along(parts: list[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The whole tensor from every rank's shard, in rank order."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    blocks = [p.chunk(stride, dim=dim) for p in parts]
    return torch.cat([blocks[r][b] for b in range(stride) for r in range(len(parts))], dim=dim)


def partition_marks(module: nn.Module) -> dict[str, tuple[int, int]]:
    """(partition_dim, partition_stride) of every sharded entry of `module`'s state dict, by name."""
    return {name: (getattr(value, "partition_dim", 0), getattr(value, "partition_stride", 1))
            for name, value in module.state_dict(keep_vars=True).items() if is_tensor_parallel(value)}


def _reshard(pieces: list[torch.Tensor], saved: tuple[int, int] | None, mine: tuple[int, int] | None,
             tp: AxisGroup) -> torch.Tensor:
    whole = merge_along(pieces, *saved) if saved is not None else pieces[0]
    return cut(whole, *mine, tp) if mine is not None else whole


def reshard_tensors(shards: list[dict[str, torch.Tensor]], saved: dict[str, tuple[int, int]],
                    mine: dict[str, tuple[int, int]], tp: AxisGroup) -> dict[str, torch.Tensor]:
    """Per-name tensors saved by each old tensor-parallel rank (in rank order) -> this rank's under `tp`."""
    return {name: _reshard([s[name] for s in shards], saved.get(name), mine.get(name), tp) if torch.is_tensor(first) else first
            for name, first in shards[0].items()}


def reshard_universal(universals: list[dict[str, Any]], saved: dict[str, tuple[int, int]],
                      mine: dict[str, tuple[int, int]], tp: AxisGroup) -> dict[str, Any]:
    """Optimizer state per parameter name (`zero.universal`), one per old tensor-parallel rank -> this rank's.

    Elementwise states (shaped like the parameter) are merged and cut like the fp32 weight; the
    rest (step counters) is taken from the first.
    """
    params = {}
    for name, first in universals[0]["params"].items():
        entries = [u["params"][name] for u in universals]
        cut = (saved.get(name), mine.get(name), tp)
        state = {key: _reshard([e["state"][key] for e in entries], *cut)
                 if torch.is_tensor(value) and value.dim() > 0 and value.shape == first["fp32"].shape else value
                 for key, value in first["state"].items()}
        params[name] = {"fp32": _reshard([e["fp32"] for e in entries], *cut), "state": state}
    return {**universals[0], "params": params}
