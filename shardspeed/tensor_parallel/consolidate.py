"""Whole tensors from tensor-parallel shards, by the marks each sharded parameter carries.

A parameter marked `tensor_model_parallel` was cut along `partition_dim`, in `partition_stride`
equal blocks (fused QKV: 3) each split over the ranks, or as evenly as possible (vocabulary rows,
which need not divide). Gathering reverses that, so the result loads into the unsharded model.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..comm.topology import AxisGroup
from .layers import is_tensor_parallel
from .reshard import merge_along


def gather_full(param: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    """The whole tensor `param` is this rank's shard of (collective over `tp`)."""
    if tp.size == 1 or not is_tensor_parallel(param):
        return param.detach()
    dim = getattr(param, "partition_dim", 0)
    stride = getattr(param, "partition_stride", 1)
    local = param.detach().contiguous()
    sizes = torch.tensor([local.shape[dim]], dtype=torch.int64, device=local.device)  # NCCL: on the device
    all_sizes = [torch.zeros_like(sizes) for _ in range(tp.size)]
    dist.all_gather(all_sizes, sizes, group=tp.group)
    widest = max(int(s.item()) for s in all_sizes)
    if local.shape[dim] < widest:  # all_gather needs equal shapes: pad, then trim
        pad_shape = list(local.shape)
        pad_shape[dim] = widest - local.shape[dim]
        local = torch.cat([local, local.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(local) for _ in range(tp.size)]
    dist.all_gather(parts, local, group=tp.group)
    return merge_along([p.narrow(dim, 0, int(s.item())) for p, s in zip(parts, all_sizes)], dim, stride)


def full_state_dict(module: nn.Module, tp: AxisGroup) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with every tensor-parallel shard replaced by its whole tensor (collective).

    Every value is a tensor of its own (replicated ones copied: as views of a ZeRO flat buffer they
    would make torch.save write the whole buffer), and a tied weight stays one tensor under its names.
    """
    whole: dict[int, torch.Tensor] = {}
    out = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) not in whole:
            whole[id(value)] = gather_full(value, tp) if is_tensor_parallel(value) else value.detach().clone()
        out[name] = whole[id(value)]
    return out
