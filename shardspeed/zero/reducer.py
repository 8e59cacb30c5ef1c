"""The one gradient reducer of every ZeRO stage: buckets of gradients summed across ranks during backward.

A bucket is a flat buffer of some parameters' gradients and the process group it is reduced over
(one per optimizer param group: expert parameters can reduce over the expert-data-parallel group
while dense ones reduce over data parallel). Where a gradient lands in the buffer, what each rank
keeps, and where the kept part goes describe every stage:

    stage 0   buffer kept between steps (`.grad` are views of it, so micro steps accumulate in
              place); at the accumulation boundary it is all-reduced and every rank keeps all of it
    stage 1   the same buffer; at the boundary each rank keeps only its own span, copied into its
              gradient partition (when it is not already there)
    stage 2   a staging buffer filled every micro step (each `.grad` copied in, then freed), reduced
              to the owners, and each rank adds its span into its gradient partition
    stage 3   as stage 2, but the buffer is laid out rank by rank ([rank 0's shards | rank 1's | ...],
              each parameter cut in equal shards), so every rank's span is the same size

A bucket is launched (asynchronously) as soon as its last gradient has arrived, while autograd
goes on with earlier layers; the end-of-backward callback launches buckets whose parameters got
no gradient (their zeros still count) and waits for all. How a sum reaches its owners depends on
the backend; `comm.collectives` decides.
"""
from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..comm.collectives import CommPolicy, Reduction, reduce_to_owners
from ..comm.topology import AxisGroup


@dataclass(frozen=True)
class ReduceOptions:
    """How gradients are combined (DeepSpeed's top-level `communication_data_type`,
    `prescale_gradients` and `gradient_predivide_factor`)."""

    comm_dtype: torch.dtype | None = None  # None: reduce in the gradients' own dtype
    predivide: float | None = None  # divided out before the sum, group size / predivide after; None: all before (as DDP)

    def factors(self, size: int) -> tuple[float, float]:
        """(before the sum, after the sum) divisors that average over `size` ranks."""
        pre = float(size if self.predivide is None else self.predivide)
        return pre, size / pre


@dataclass(eq=False)
class Member:
    """Where one parameter's gradient goes in its bucket's buffer.

    `shard` 0: contiguously at `offset`. `shard` > 0: rank-major; the buffer is `world` rows, and the
    gradient (padded to world * shard) fills columns [offset, offset + shard) of every row.
    """

    param: torch.nn.Parameter
    offset: int
    shard: int = 0


@dataclass(eq=False)
class Bucket:
    axis: AxisGroup
    members: list[Member]
    numel: int
    spans: Sequence[tuple[int, int]] | None  # each rank's [lo, hi) of the buffer; None: all-reduce, keep all
    dest: torch.Tensor | None = None  # where this rank's reduced span goes (None: it stays in `buffer`)
    buffer: torch.Tensor | None = None  # kept across micro steps (stages 0-1); None: a staging buffer per backward
    # regions of a staging buffer no member writes (layout padding): zeroed when a buffer is taken
    padding: list[tuple[int, int]] = field(default_factory=list)
    pending: int = 0
    launched: bool = False
    arrived: set[torch.nn.Parameter] = field(default_factory=set)
    staging: torch.Tensor | None = None  # the bucket's staging elements (a view of `pooled`) while it fills and reduces
    pooled: torch.Tensor | None = None
    sent: torch.Tensor | None = None
    reduction: Reduction | None = None
    # The number of ranks the sum is averaged over; 0: the group's size. Expert gradients are summed over
    # the expert-data-parallel group but averaged over all data-parallel ranks (see ParamGroupComm).
    average_over: int = 0

    @property
    def divisor(self) -> int:
        return self.average_over or self.axis.size

    @property
    def staged(self) -> bool:
        return self.buffer is None


class GradientReducer:
    """Owns the gradient buckets of a strategy and reduces them while backward runs.

    `listener(param)` is told when a parameter's gradient has been taken (stage 3 releases the
    gathered weights of a unit once all of its gradients are in). `max_in_flight` bounds the
    buckets being reduced at once besides the one being filled (stage 2-3 staging memory).
    `keep_staging`: staging buffers stay pooled between backwards (no re-allocation; stage 2) or
    are freed at the end of each backward (stage 3, whose memory between steps is the point).
    """

    def __init__(self, buckets: list[Bucket], options: ReduceOptions, overlap: bool = True, max_in_flight: int = 2,
                 listener: Callable[[torch.nn.Parameter], None] | None = None,
                 policy: CommPolicy | None = None, keep_staging: bool = True) -> None:
        self.buckets = buckets
        self.options = options
        self.overlap = overlap
        self.max_in_flight = max_in_flight
        self.listener = listener
        self.keep_staging = keep_staging
        self.policy = policy or (CommPolicy.for_group(buckets[0].axis.group) if buckets else CommPolicy(False, False))
        self._member: dict[torch.nn.Parameter, Member] = {}
        self._bucket_of: dict[torch.nn.Parameter, Bucket] = {}
        for bucket in buckets:
            for m in bucket.members:
                self._member[m.param] = m
                self._bucket_of[m.param] = bucket
        # Staging buffers are pooled by (dtype, elements). Kept between backwards (stage 2), every buffer
        # of a dtype has the size of its largest bucket, so the pool stays at the few in use at once;
        # freed after each backward (stage 3), each bucket takes one of exactly its size, so a small
        # bucket never holds a big buffer (the persistent unit's fills all through backward).
        self._uniform: dict[torch.dtype, int] = {}
        for b in buckets:
            if b.staged and keep_staging:
                dtype = b.members[0].param.dtype
                self._uniform[dtype] = max(self._uniform.get(dtype, 0), b.numel)
        self._free_staging: dict[tuple[torch.dtype, int], list[torch.Tensor]] = {}
        self.staging_peak_bytes = 0
        self._staging_live = 0
        self._in_flight: deque[Bucket] = deque()
        self.sync = False
        self._callback_queued = False
        self._views = {m.param: self._view(b, m) for b in buckets if not b.staged for m in b.members}
        self._reset()
        self.zero()
        ref = weakref.ref(self)

        def on_grad_ready(param: torch.nn.Parameter) -> None:
            reducer = ref()  # weak: the model's parameters must not keep a dropped engine's reducer alive
            if reducer is not None:
                reducer._on_grad_ready(param)

        self._handles = [p.register_post_accumulate_grad_hook(on_grad_ready) for p in self._member]
        self._detach = weakref.finalize(self, _remove_all, self._handles)  # dropped: off the parameters too

    @staticmethod
    def _view(bucket: Bucket, m: Member) -> torch.Tensor:
        assert bucket.buffer is not None and m.shard == 0
        return bucket.buffer[m.offset:m.offset + m.param.numel()].view_as(m.param)

    # ---- per backward ------------------------------------------------------------------------------
    def prepare(self, boundary: bool) -> None:
        """Before a backward: kept buffers are reduced only on the accumulation boundary, staged ones always."""
        self.sync = boundary

    def _reset(self) -> None:
        for bucket in self.buckets:
            bucket.pending = len(bucket.members)
            bucket.launched = False
            bucket.arrived.clear()

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        if not self._callback_queued:  # the first gradient of this backward
            self._callback_queued = True
            ref = weakref.ref(self)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: _call_end(ref))
        bucket = self._bucket_of[param]
        if bucket.staged:
            self._stage(bucket, self._member[param], param.grad)
            param.grad = None  # the whole gradient is not kept (stages 2-3)
        else:
            view = self._views[param]
            if param.grad is not view:
                assert param.grad is not None  # a post-accumulate-grad hook runs once .grad is set
                view.copy_(param.grad)  # someone replaced .grad (zero_grad(set_to_none=True)); fold it back in
                param.grad = view
        bucket.arrived.add(param)
        if self.listener is not None:
            self.listener(param)
        if self.sync or bucket.staged:
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)

    def _stage(self, bucket: Bucket, m: Member, grad: torch.Tensor | None) -> None:
        """Write one gradient (None: zeros) into the bucket's staging buffer."""
        buf = self._staging(bucket)
        n = m.param.numel()
        if m.shard == 0:
            region = buf[m.offset:m.offset + n]
            region.copy_(grad.reshape(-1)) if grad is not None else region.zero_()
            return
        world = bucket.axis.size
        rows = buf.view(world, bucket.numel // world)[:, m.offset:m.offset + m.shard]
        if grad is None:
            rows.zero_()
            return
        flat = grad.reshape(-1)
        full, rem = divmod(n, m.shard)
        if full:
            rows[:full].copy_(flat[:full * m.shard].view(full, m.shard))
        if full < world:  # the padding of the last shard(s)
            if rem:
                rows[full, :rem].copy_(flat[full * m.shard:])
                rows[full, rem:].zero_()
                rows[full + 1:].zero_()
            else:
                rows[full:].zero_()

    def _staging(self, bucket: Bucket) -> torch.Tensor:
        if bucket.staging is None:
            first = bucket.members[0].param
            size = self._uniform.get(first.dtype, bucket.numel)
            free = self._free_staging.setdefault((first.dtype, size), [])
            pooled = free.pop() if free else torch.empty(size, dtype=first.dtype, device=first.device)
            bucket.pooled, bucket.staging = pooled, pooled[:bucket.numel]
            self._staging_live += pooled.numel() * pooled.element_size()
            self.staging_peak_bytes = max(self.staging_peak_bytes, self._staging_live)
            for lo, hi in bucket.padding:
                bucket.staging[lo:hi].zero_()
        return bucket.staging

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        tensor = self._staging(bucket) if bucket.staged else bucket.buffer
        assert tensor is not None
        comm_dtype = self.options.comm_dtype
        sent = tensor.to(comm_dtype) if comm_dtype is not None and comm_dtype != tensor.dtype else tensor
        pre, _ = self.options.factors(bucket.divisor)
        if pre != 1.0:
            sent.div_(pre)
        bucket.sent = sent
        bucket.reduction = reduce_to_owners(sent, bucket.spans, bucket.axis, self.policy)
        self._in_flight.append(bucket)
        if not self.overlap:
            self._finish(bucket)
        while len(self._in_flight) > self.max_in_flight:
            self._finish(self._in_flight[0])

    def _finish(self, bucket: Bucket) -> None:
        """Wait for a bucket's reduction and put this rank's share where the optimizer reads it."""
        self._in_flight.remove(bucket)
        assert bucket.reduction is not None and bucket.sent is not None
        mine = bucket.reduction.wait()
        _, post = self.options.factors(bucket.divisor)
        if bucket.dest is None:  # stage 0: every rank keeps the whole sum, in its buffer
            assert bucket.buffer is not None
            if bucket.sent is not bucket.buffer:
                bucket.buffer.copy_(bucket.sent)
            if post != 1.0:
                bucket.buffer.div_(post)
        else:
            value = mine / post if post != 1.0 else mine
            if bucket.staged:
                bucket.dest.add_(value.to(device=bucket.dest.device, dtype=bucket.dest.dtype))
            elif value.data_ptr() != bucket.dest.data_ptr() or value.dtype != bucket.dest.dtype:
                bucket.dest.copy_(value)  # stage 1: unless the all-reduce already left it in place
        if bucket.pooled is not None:
            self._free_staging[(bucket.pooled.dtype, bucket.pooled.numel())].append(bucket.pooled)
            self._staging_live -= bucket.pooled.numel() * bucket.pooled.element_size()
            bucket.pooled, bucket.staging = None, None
        bucket.sent, bucket.reduction = None, None

    def _on_backward_end(self) -> None:
        """Reduce buckets that still wait for gradients that never came (unused parameters: zeros), then wait."""
        self._callback_queued = False
        for bucket in self.buckets:
            if bucket.launched or not (self.sync or bucket.staged):
                continue
            if bucket.staged:
                for m in bucket.members:
                    if m.param not in bucket.arrived:
                        self._stage(bucket, m, None)
            self._launch(bucket)
        self.wait()
        self._reset()
        if not self.keep_staging:
            for free in self._free_staging.values():
                free.clear()

    def wait(self) -> None:
        while self._in_flight:
            self._finish(self._in_flight[0])
        self.sync = False

    # ---- between steps -------------------------------------------------------------------------------
    def zero(self) -> None:
        """Zero the kept buffers and point `.grad` at them again (they are the gradients)."""
        for bucket in self.buckets:
            if bucket.buffer is not None:
                bucket.buffer.zero_()
        for p, view in self._views.items():
            if p.grad is not view:
                p.grad = view

    def rebind(self) -> None:
        """Point `.grad` back at the kept buffer wherever someone set it to None (values untouched)."""
        for p, view in self._views.items():
            if p.grad is None:
                p.grad = view

    def kept_bytes(self) -> int:
        """Bytes of the buffers kept between steps (stages 0-1: the gradients themselves)."""
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets if b.buffer is not None)

    def staging_bytes(self) -> int:
        """Bytes of staging buffers held in the pool now."""
        return sum(t.numel() * t.element_size() for free in self._free_staging.values() for t in free)

    def remove(self) -> None:
        self._detach()


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


def _call_end(ref: "weakref.ReferenceType[GradientReducer]") -> None:
    reducer = ref()
    if reducer is not None:
        reducer._on_backward_end()


# ---- building buckets ---------------------------------------------------------------------------------
def contiguous_members(params: Sequence[torch.nn.Parameter], cap: int) -> list[list[Member]]:
    """Params cut into runs of at most `cap` elements (a bigger one alone) that share dtype and device,
    each param at its offset in its run."""
    runs: list[list[Member]] = []
    size = 0
    for p in params:
        if not runs or (runs[-1] and (p.dtype != runs[-1][0].param.dtype or p.device != runs[-1][0].param.device
                                      or size + p.numel() > cap)):
            runs.append([])
            size = 0
        runs[-1].append(Member(p, size))
        size += p.numel()
    return [r for r in runs if r]


def spans_in(bucket_start: int, bucket_end: int, partition_size: int, world: int) -> list[tuple[int, int]]:
    """Each rank's part of the flat range [bucket_start, bucket_end) of a buffer cut in `world` equal
    partitions, relative to bucket_start (a rank owning none of it gets an empty span)."""
    n = bucket_end - bucket_start
    spans = []
    for r in range(world):
        lo = min(max(r * partition_size - bucket_start, 0), n)
        hi = min(max((r + 1) * partition_size - bucket_start, 0), n)
        spans.append((lo, hi))
    return spans
