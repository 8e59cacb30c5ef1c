"""The four collectives of Megatron-style tensor parallelism, as autograd functions.

Each pairs a forward with the backward that keeps gradients exact:

    copy_to_tp       forward: identity             backward: all-reduce (sum)
    reduce_from_tp   forward: all-reduce (sum, in place: pass a fresh tensor)   backward: identity
    scatter_to_tp    forward: keep this rank's slice of the last dim   backward: all-gather it
    gather_from_tp   forward: all-gather the last dim                  backward: keep this rank's slice

`torch.distributed.nn.functional.all_reduce` differentiates to another all-reduce, which would
multiply a replicated gradient by the group size; hence these.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..comm.topology import AxisGroup, axis_of_group


def as_tp_group(group: AxisGroup | dist.ProcessGroup | None) -> AxisGroup:
    """A tensor-parallel group from an AxisGroup, a torch ProcessGroup or None (every rank)."""
    if isinstance(group, AxisGroup):
        return group
    if group is None:
        if not dist.is_initialized():
            raise RuntimeError("tensor-parallel layers need torch.distributed: call shardspeed.init_distributed() first")
        group = dist.group.WORLD
        assert group is not None  # set once torch.distributed is initialised, checked above
    return axis_of_group(group)


def _all_reduce(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    if tp.size > 1:
        x = x.contiguous()
        dist.all_reduce(x, group=tp.group)
    return x


def _gather_last(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=-1)


def _slice_last(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    if tp.size == 1:
        return x
    if x.shape[-1] % tp.size:
        raise ValueError(f"last dimension {x.shape[-1]} does not split evenly over {tp.size} tensor-parallel ranks")
    return x.chunk(tp.size, dim=-1)[tp.rank].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
        ctx.tp = tp
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad.clone(), ctx.tp), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
        if not x.is_contiguous():
            return _all_reduce(x.contiguous(), tp)
        # In place, without a copy per layer per micro step: the callers (a row-parallel layer's
        # matmul, the embedding's masked lookup) pass a fresh tensor no backward has saved.
        ctx.mark_dirty(x)
        return _all_reduce(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
        ctx.tp = tp
        return _slice_last(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _gather_last(grad, ctx.tp), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
        ctx.tp = tp
        return _gather_last(x, tp)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _slice_last(grad, ctx.tp), None


def copy_to_tp(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    return _CopyToTP.apply(x, tp) if tp.size > 1 else x


def reduce_from_tp(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    return _ReduceFromTP.apply(x, tp) if tp.size > 1 else x


def scatter_to_tp(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    return _ScatterToTP.apply(x, tp) if tp.size > 1 else x


def gather_from_tp(x: torch.Tensor, tp: AxisGroup) -> torch.Tensor:
    return _GatherFromTP.apply(x, tp) if tp.size > 1 else x
