"""Gradient reduction into partition owners for ZeRO stages 1 and 2, overlapping backward.

Stage 1 keeps a full flat gradient buffer per group (params' `.grad` are views into it, so
micro steps accumulate in place) and reduces it bucket by bucket on the boundary backward.
Stage 2 keeps only this rank's gradient partition: every micro step, each gradient is copied
into a staging bucket and freed, full buckets are reduced to their owners, and each rank adds
its share into its partition.

How a bucket reaches its owners depends on the backend: with NCCL, a reduce-scatter; with gloo,
whose reduce-scatter is an all-reduce underneath (twice the bytes), one in-place all-reduce, of
which each rank keeps its own slice. `reduce_scatter: false` always all-reduces, as in DeepSpeed.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..comm.topology import AxisGroup
from .layout import GroupLayout, bucket_ranges


@dataclass(eq=False)
class _Bucket:
    group: int
    start: int
    end: int
    params: list[torch.nn.Parameter]
    pending: int = 0
    staging: torch.Tensor | None = None  # stage 2 only
    work: dist.Work | None = None
    result: torch.Tensor | None = None  # what the collective writes into
    comm_copy: torch.Tensor | None = field(default=None, repr=False)


class PartitionedGradients:
    """Owns gradient memory for partitioned groups and delivers each rank its reduced partition."""

    MAX_IN_FLIGHT = 1  # with the bucket being filled: two staging buffers, each <= reduce_bucket_size

    def __init__(
        self,
        layouts: list[GroupLayout],
        params: list[list[torch.nn.Parameter]],
        dp: AxisGroup,
        bucket_elements: int,
        partition_grads: bool,
        reduce_scatter: bool,
        overlap: bool,
        comm_dtype: torch.dtype | None = None,
        predivide: float | None = None,
    ) -> None:
        self.layouts = layouts
        self.dp = dp
        self.partition_grads = partition_grads
        self.reduce_scatter = reduce_scatter
        self.overlap = overlap
        self.comm_dtype = comm_dtype
        self.predivide = float(dp.size if predivide is None else predivide)
        dtype, device = params[0][0].dtype, params[0][0].device
        self.own = [layout.partition(dp.rank) for layout in layouts]
        if partition_grads:
            self.flat_grads: list[torch.Tensor] = []
            self.partitions = [torch.zeros(l.partition_size, dtype=dtype, device=device) for l in layouts]
        else:
            self.flat_grads = [torch.zeros(l.padded_numel, dtype=dtype, device=device) for l in layouts]
            self.partitions = [flat[s:e] for flat, (s, e) in zip(self.flat_grads, self.own)]
        self.buckets: list[_Bucket] = []
        self._slot: dict[torch.nn.Parameter, tuple[_Bucket, int]] = {}  # param -> (bucket, offset in bucket)
        for g, (layout, plist) in enumerate(zip(layouts, params)):
            by_slot = list(zip(layout.slots, plist))
            for start, end in bucket_ranges(layout, bucket_elements):
                members = [(slot, p) for slot, p in by_slot if start <= slot.offset < end]
                bucket = _Bucket(g, start, end, [p for _, p in members])
                self.buckets.append(bucket)
                for slot, p in members:
                    self._slot[p] = (bucket, slot.offset - start)
        self._views = {p: self._grad_view(p) for p in self._slot} if not partition_grads else {}
        self.zero()
        self.sync_enabled = False
        self._callback_queued = False
        # Stage 2 memory bound: at most MAX_IN_FLIGHT buckets are being reduced at once, and staging
        # buffers (each the size of the largest bucket) are reused from a pool.
        self._staging_size = max(b.end - b.start for b in self.buckets)
        self._free_staging: list[torch.Tensor] = []
        self._in_flight: deque[_Bucket] = deque()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._slot]

    def _grad_view(self, p: torch.nn.Parameter) -> torch.Tensor:
        bucket, offset = self._slot[p]
        start = bucket.start + offset
        return self.flat_grads[bucket.group][start:start + p.numel()].view_as(p)

    # ---- per backward ----------------------------------------------------------------------
    def prepare(self, boundary: bool) -> None:
        # Stage 2 must reduce every micro step: no rank keeps the full gradient between steps.
        self.sync_enabled = self.partition_grads or boundary
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        bucket, offset = self._slot[param]
        if self.partition_grads:
            self._stage(bucket).narrow(0, offset, param.numel()).add_(param.grad.reshape(-1))
            param.grad = None  # the full gradient is not kept (stage 2)
        elif param.grad is not self._views[param]:
            self._views[param].copy_(param.grad)  # someone replaced .grad; fold it back in
            param.grad = self._views[param]
        if not self.sync_enabled:
            return
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _stage(self, bucket: _Bucket) -> torch.Tensor:
        if bucket.staging is None:
            buffer = self._free_staging.pop() if self._free_staging else torch.empty(
                self._staging_size, dtype=self.partitions[0].dtype, device=self.partitions[0].device)
            bucket.staging = buffer
            buffer[: bucket.end - bucket.start].zero_()
        return bucket.staging[: bucket.end - bucket.start]

    def _launch(self, bucket: _Bucket) -> None:
        tensor = self._stage(bucket) if self.partition_grads else self.flat_grads[bucket.group][bucket.start:bucket.end]
        if self.comm_dtype is not None and self.comm_dtype != tensor.dtype:
            bucket.comm_copy = tensor
            tensor = tensor.to(self.comm_dtype)
        if self.predivide != 1.0:
            tensor.div_(self.predivide)
        layout = self.layouts[bucket.group]
        if self.reduce_scatter and self.dp.size > 1:
            spans = [self._intersection(layout, bucket, r) for r in range(self.dp.size)]
            chunk = max(hi - lo for lo, hi in spans)
            send = torch.zeros(chunk * self.dp.size, dtype=tensor.dtype, device=tensor.device)
            for r, (lo, hi) in enumerate(spans):
                send[r * chunk:r * chunk + hi - lo] = tensor[lo - bucket.start:hi - bucket.start]
            bucket.result = torch.empty(chunk, dtype=tensor.dtype, device=tensor.device)
            bucket.work = dist.reduce_scatter_tensor(bucket.result, send, group=self.dp.group, async_op=True)
        else:
            bucket.result = tensor
            bucket.work = dist.all_reduce(tensor, group=self.dp.group, async_op=True) if self.dp.size > 1 else None
        self._in_flight.append(bucket)
        if not self.overlap:
            self._finish(bucket)
        while len(self._in_flight) > self.MAX_IN_FLIGHT:
            self._finish(self._in_flight[0])

    @staticmethod
    def _intersection(layout: GroupLayout, bucket: _Bucket, rank: int) -> tuple[int, int]:
        s, e = layout.partition(rank)
        lo, hi = max(s, bucket.start), min(e, bucket.end)
        return (lo, hi) if lo < hi else (lo, lo)

    def _finish(self, bucket: _Bucket) -> None:
        """Wait for a bucket's collective and put this rank's share where the optimizer reads it."""
        if bucket.result is None:
            return
        if bucket in self._in_flight:
            self._in_flight.remove(bucket)
        if bucket.work is not None:
            bucket.work.wait()
        post = self.dp.size / self.predivide
        layout = self.layouts[bucket.group]
        lo, hi = self._intersection(layout, bucket, self.dp.rank)
        s, _ = self.own[bucket.group]
        if self.reduce_scatter and self.dp.size > 1:
            mine = bucket.result[:hi - lo]
        else:
            mine = bucket.result[lo - bucket.start:hi - bucket.start]
        if post != 1.0:
            mine = mine / post
        if self.partition_grads:
            self.partitions[bucket.group][lo - s:hi - s].add_(mine.to(self.partitions[0].dtype))
            self._free_staging.append(bucket.staging)
            bucket.staging = None
        elif self.reduce_scatter or bucket.comm_copy is not None or post != 1.0:
            self.partitions[bucket.group][lo - s:hi - s].copy_(mine)
        bucket.work, bucket.result, bucket.comm_copy = None, None, None

    def _on_backward_end(self) -> None:
        """Reduce buckets that still wait for gradients that never came (unused parameters: zeros)."""
        self._callback_queued = False
        for bucket in self.buckets:
            if bucket.pending > 0 and bucket.result is None:
                self._launch(bucket)
        self.wait()

    def wait(self) -> None:
        while self._in_flight:
            self._finish(self._in_flight[0])
        self.sync_enabled = False

    # ---- between steps -----------------------------------------------------------------------
    def zero(self) -> None:
        for part in self.partitions:
            part.zero_()
        for flat in self.flat_grads:
            flat.zero_()
        for p, view in self._views.items():
            p.grad = view

    def buffer_bytes(self) -> dict[str, int]:
        grads = sum(t.numel() * t.element_size() for t in (self.flat_grads or self.partitions))
        staging = sum(t.numel() * t.element_size() for t in self._free_staging)
        return {"gradients": grads, "gradient_buckets": staging}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
