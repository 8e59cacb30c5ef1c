"""Moving routed tokens to their experts and back, without padding to capacity.

Only kept routes travel. Each rank sorts its kept routes by global expert id, tells every peer how many
rows it will send to each of the peer's experts (an equal-split all-to-all of counts), and swaps the
rows themselves with one all-to-all-v over the expert-parallel group. Each local expert runs once on
its contiguous chunk (possibly empty), the outputs go back by the reverse all-to-all-v, and the routes
are combined with their weights in fp32.

Layouts, for a rank with S tokens, k routes per token, E experts in all, P ranks, L = E / P local:
    routes (flat id r * S + s)  --sort by expert-->  send rows, grouped by destination rank then expert
    received rows: grouped by source rank, then local expert  --regroup-->  by local expert, then source
With P = 1 there is no collective at all (torch.distributed need not be initialised).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm.topology import AxisGroup

FIRST_ALLTOALL = "1st_a2a"
SECOND_ALLTOALL = "2nd_a2a"
RunExperts = Callable[[Sequence[Tensor]], Sequence[Tensor]]


@dataclass(frozen=True)
class ExpertParallel:
    """This rank's expert-parallel group: its torch group, size, and this rank's index in it."""

    group: dist.ProcessGroup
    size: int
    rank: int

    @classmethod
    def of(cls, group: dist.ProcessGroup | AxisGroup) -> "ExpertParallel":
        if isinstance(group, AxisGroup):
            if group.group is None:
                raise ValueError("the expert-parallel AxisGroup has no process group")
            return cls(group.group, group.size, group.rank)
        return cls(group, dist.get_world_size(group), dist.get_rank(group))


def _all_to_all_v(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
    return out


class _AllToAllV(torch.autograd.Function):
    """All-to-all-v of rows in forward (send `in_splits[j]` rows to rank j, receive `out_splits[j]`);
    in backward the same exchange reversed, sending each gradient row back where its row came from."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all_v(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        return _all_to_all_v(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all_v(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Differentiable all-to-all-v of the rows of `x` (see `_AllToAllV`)."""
    return _AllToAllV.apply(x, out_splits, in_splits, group)


def _run_chunks(rows: Tensor, sizes: list[int], run_experts: RunExperts) -> Tensor:
    return torch.cat(list(run_experts(rows.split(sizes))), dim=0)


def _exchange_and_run(rows: Tensor, counts: Tensor, ep: ExpertParallel, run_experts: RunExperts,
                      timings: dict[str, float]) -> Tensor:
    """Rows grouped by global expert -> their experts' ranks -> expert outputs, back in the same order."""
    local = counts.numel() // ep.size
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=ep.group)  # [P * L]: from each source, rows per local expert
    received = received.view(ep.size, local)
    send_splits = counts.view(ep.size, local).sum(dim=1).tolist()
    recv_splits = received.sum(dim=1).tolist()

    start = time.perf_counter()
    inbox = all_to_all_v(rows, recv_splits, send_splits, ep.group)
    timings[FIRST_ALLTOALL] = (time.perf_counter() - start) * 1000.0
    expert_of_row = torch.arange(local, device=counts.device).repeat(ep.size).repeat_interleave(received.reshape(-1))
    by_expert = torch.argsort(expert_of_row, stable=True)  # source-major -> expert-major, sources in order
    outputs = _run_chunks(inbox.index_select(0, by_expert), received.sum(dim=0).tolist(), run_experts)
    outputs = outputs.index_select(0, torch.argsort(by_expert))  # back to source-major

    start = time.perf_counter()
    back = all_to_all_v(outputs, send_splits, recv_splits, ep.group)
    timings[SECOND_ALLTOALL] = (time.perf_counter() - start) * 1000.0
    return back


def dispatch_and_combine(tokens: Tensor, experts: Tensor, weights: Tensor, num_experts: int, run_experts: RunExperts,
                         ep: ExpertParallel | None, timings: dict[str, float] | None = None) -> Tensor:
    """Sum over kept routes of `weights` x expert(token), for `tokens` [S, M].

    `experts` [k, S]: each route's global expert id, -1 for a dropped route; `weights` [k, S] fp32.
    `run_experts(chunks)` runs local expert i on `chunks[i]` (rows [n_i, M], n_i may be 0). `ep`: the
    expert-parallel group, or None for ep_size 1. The sum runs over routes in order in fp32 and is cast
    to the experts' output dtype, as DeepSpeed's decode does. Collective over `ep` (every rank calls it).
    """
    timings = {} if timings is None else timings
    k, num_tokens = experts.shape
    flat = experts.reshape(-1)
    kept = torch.nonzero(flat >= 0).squeeze(1)
    slots = kept[torch.argsort(flat[kept], stable=True)]  # flat route ids, grouped by expert
    counts = torch.bincount(flat[slots], minlength=num_experts)
    rows = tokens.index_select(0, slots % max(num_tokens, 1))
    if ep is None or ep.size == 1:
        outputs = _run_chunks(rows, counts.tolist(), run_experts)
    else:
        outputs = _exchange_and_run(rows, counts, ep, run_experts, timings)
    routed = outputs.new_zeros((k * num_tokens, outputs.shape[-1])).index_copy(0, slots, outputs)
    combined = torch.sum(routed.view(k, num_tokens, -1) * weights.unsqueeze(-1), dim=0)
    return combined.to(outputs.dtype)
