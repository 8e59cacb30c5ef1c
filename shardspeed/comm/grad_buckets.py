"""Bucketed data-parallel gradient all-reduce that overlaps the backward pass.

Each trainable parameter's `.grad` is a view into a flat per-bucket buffer, so autograd
accumulates straight into the buffers across micro steps. On a boundary backward, a bucket is
all-reduced (asynchronously) as soon as every gradient in it is final, while autograd goes on
with earlier layers; the end-of-backward callback launches what is left and waits for all. On
non-boundary micro steps nothing is communicated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .topology import AxisGroup


@dataclass
class _Bucket:
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor
    offsets: list[int]
    pending: int = 0
    work: dist.Work | None = None
    comm_buffer: torch.Tensor | None = field(default=None, repr=False)


class GradientBucketReducer:
    """Owns the gradient buffers of `params` and averages them over `group` at boundaries.

    `bucket_elements` caps a bucket's size (DeepSpeed's `reduce_bucket_size`); params are packed
    in reverse order, the order backward usually produces them. `predivide` is divided out before
    the sum and `world/predivide` after it (DeepSpeed's gradient_predivide_factor; 1 divides
    fully before, as DDP does, which keeps fp16 sums in range).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        group: AxisGroup,
        bucket_elements: int,
        comm_dtype: torch.dtype | None = None,
        predivide: float | None = None,
    ) -> None:
        self.group = group
        self.world = group.size
        self.comm_dtype = comm_dtype
        self.predivide = float(self.world if predivide is None else predivide)
        self.sync_enabled = False
        self._callback_queued = False
        self.buckets = self._build_buckets([p for p in reversed(params) if p.requires_grad], bucket_elements)
        self._bucket_of: dict[torch.nn.Parameter, _Bucket] = {}
        self._views: dict[torch.nn.Parameter, torch.Tensor] = {}
        for bucket in self.buckets:
            for p, offset in zip(bucket.params, bucket.offsets):
                self._bucket_of[p] = bucket
                self._views[p] = bucket.buffer[offset:offset + p.numel()].view_as(p)
                p.grad = self._views[p]
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._bucket_of]

    @staticmethod
    def _build_buckets(params: list[torch.nn.Parameter], cap: int) -> list[_Bucket]:
        buckets: list[_Bucket] = []
        current: list[torch.nn.Parameter] = []

        def close() -> None:
            if not current:
                return
            total = sum(p.numel() for p in current)
            buffer = torch.zeros(total, dtype=current[0].dtype, device=current[0].device)
            offsets, offset = [], 0
            for p in current:
                offsets.append(offset)
                offset += p.numel()
            buckets.append(_Bucket(list(current), buffer, offsets))
            current.clear()

        size = 0
        for p in params:
            if current and (p.dtype != current[0].dtype or p.device != current[0].device or size + p.numel() > cap):
                close()
                size = 0
            current.append(p)
            size += p.numel()
        close()
        return buckets

    def prepare(self, sync: bool) -> None:
        """Called before each backward: `sync` is true on the accumulation boundary."""
        self.sync_enabled = sync and self.world > 1
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)
            bucket.work = None

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        bucket = self._bucket_of[param]
        view = self._views[param]
        if param.grad is not view and param.grad is not None:
            # Someone replaced .grad (e.g. zero_grad(set_to_none=True)); fold it back into the bucket.
            view.copy_(param.grad)
            param.grad = view
        if not self.sync_enabled:
            return
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        tensor = bucket.buffer
        if self.comm_dtype is not None and self.comm_dtype != tensor.dtype:
            bucket.comm_buffer = tensor.to(self.comm_dtype)
            tensor = bucket.comm_buffer
        if self.predivide != 1.0:
            tensor.div_(self.predivide)
        bucket.work = dist.all_reduce(tensor, group=self.group.group, async_op=True)

    def _on_backward_end(self) -> None:
        """Launch buckets whose params got no gradient this step (their zeros still count), then wait."""
        self._callback_queued = False
        for bucket in self.buckets:
            if bucket.work is None:
                self._launch(bucket)
        self.wait()

    def wait(self) -> None:
        post = self.world / self.predivide
        for bucket in self.buckets:
            if bucket.work is None:
                continue
            bucket.work.wait()
            bucket.work = None
            if bucket.comm_buffer is not None:
                bucket.buffer.copy_(bucket.comm_buffer)
                bucket.comm_buffer = None
            if post != 1.0:
                bucket.buffer.div_(post)
        self.sync_enabled = False

    def zero(self) -> None:
        """Zero every gradient buffer and re-point `.grad` at it (the buffers are the gradients)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()
        for p, view in self._views.items():
            if p.grad is not view:
                p.grad = view

    def buffer_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
