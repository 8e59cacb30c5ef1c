"""The collectives ZeRO is built from, and the one place where their implementation depends on the backend.

gloo (CPU) and NCCL (GPU) want different implementations of the same operation:
- gloo's reduce-scatter is an all-reduce underneath (twice the bytes), so reducing a buffer to its
  owners is one in-place all-reduce of which each rank keeps its own span;
- gloo's all-gather is slower than its all-reduce of the same result (measured here: 0.24 s to
  gather 2 x 13.7M fp32 elements, 0.09-0.12 s to all-reduce all 27.4M), and needs a second buffer,
  so gathering is an all-reduce of a buffer that holds zeros everywhere but this rank's shards
  (exact: every element has one non-zero addend).
NCCL uses reduce-scatter and all-gather. `CommPolicy.for_group` makes the choice; code above
this module never looks at the backend. Tests force NCCL's paths on gloo with `CommPolicy.native()`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .topology import AxisGroup


@dataclass(frozen=True)
class CommPolicy:
    """How ZeRO's collectives are carried out on one group."""

    gather_by_all_reduce: bool  # gloo: sum a zero-masked buffer instead of all-gathering
    scatter_by_all_reduce: bool  # gloo: all-reduce and keep one's own span instead of reduce-scattering
    # With one rank, gathers and reductions are plain copies. The GPU check (benchmarks/gpu_zero3.py)
    # turns this on to run the NCCL code path on a single GPU.
    collectives_at_world_1: bool = False

    @classmethod
    def for_group(cls, group: dist.ProcessGroup | None) -> "CommPolicy":
        gloo = dist.get_backend(group) == "gloo"
        return cls(gather_by_all_reduce=gloo, scatter_by_all_reduce=gloo)

    @classmethod
    def native(cls, collectives_at_world_1: bool = False) -> "CommPolicy":
        """NCCL's implementations (all-gather, reduce-scatter), whatever the backend."""
        return cls(gather_by_all_reduce=False, scatter_by_all_reduce=False, collectives_at_world_1=collectives_at_world_1)

    def communicates(self, axis: AxisGroup) -> bool:
        return axis.size > 1 or self.collectives_at_world_1


class Reduction:
    """A reduction in flight; `wait()` returns this rank's reduced span (a view or a fresh tensor)."""

    def __init__(self, work: Any, result: torch.Tensor) -> None:
        self._work, self._result = work, result

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._result


def reduce_to_owners(buffer: torch.Tensor, spans: Sequence[tuple[int, int]] | None, axis: AxisGroup,
                     policy: CommPolicy) -> Reduction:
    """Start summing `buffer` over `axis`; each rank ends up with the sum over its own span.

    `spans[r]` is rank r's [lo, hi) in `buffer` (None: every rank keeps all of it, an all-reduce).
    With the all-reduce implementation the sum is left in `buffer` itself.
    """
    mine = (0, buffer.numel()) if spans is None else spans[axis.rank]
    if not policy.communicates(axis):
        return Reduction(None, buffer[mine[0]:mine[1]])
    if spans is None or policy.scatter_by_all_reduce:
        work = dist.all_reduce(buffer, group=axis.group, async_op=True)
        return Reduction(work, buffer[mine[0]:mine[1]])
    sizes = [hi - lo for lo, hi in spans]
    chunk = max(sizes)
    if all(size == chunk for size in sizes) and all(spans[r][0] == r * chunk for r in range(len(spans))) \
            and buffer.numel() == chunk * len(spans):
        send = buffer  # already laid out rank by rank in equal chunks: no copy
    else:
        send = torch.zeros(chunk * len(spans), dtype=buffer.dtype, device=buffer.device)
        for r, (lo, hi) in enumerate(spans):
            send[r * chunk:r * chunk + hi - lo] = buffer[lo:hi]
    out = torch.empty(chunk, dtype=buffer.dtype, device=buffer.device)
    work = dist.reduce_scatter_tensor(out, send, group=axis.group, async_op=True)
    return Reduction(work, out[:mine[1] - mine[0]])


def all_gather_partitions(flat: torch.Tensor, partition_size: int, axis: AxisGroup, chunk_elements: int,
                          policy: CommPolicy) -> None:
    """Fill `flat` (laid out as [rank 0's partition | rank 1's | ...]) from each rank's own partition.

    Work is cut into chunks of `chunk_elements` per rank (`allgather_bucket_size`).
    """
    if not policy.communicates(axis):
        return
    start, end = axis.rank * partition_size, (axis.rank + 1) * partition_size
    if policy.gather_by_all_reduce:
        flat[:start].zero_()
        flat[end:].zero_()
        step = max(1, chunk_elements) * axis.size
        works = [dist.all_reduce(flat[lo:lo + step], group=axis.group, async_op=True) for lo in range(0, flat.numel(), step)]
        for work in works:
            work.wait()
        return
    if chunk_elements >= partition_size:
        dist.all_gather_into_tensor(flat, flat[start:end].clone(), group=axis.group)
        return
    for lo in range(0, partition_size, chunk_elements):
        hi = min(partition_size, lo + chunk_elements)
        outputs = [flat[r * partition_size + lo:r * partition_size + hi] for r in range(axis.size)]
        dist.all_gather(outputs, outputs[axis.rank].clone(), group=axis.group)

