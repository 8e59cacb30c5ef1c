"""Model-state bytes per rank, as shardspeed's ZeRO strategies allocate them.

Computed from the parameters' shapes with ZeRO's own layout code (`zero.layout` for stages 1-2,
`zero.unit_plan` for stage 3's units, `offload.optimizer_offload.cut_sub_groups` for offload), so
padding, partition sizes and sub-groups are exactly the engine's. The names are the engine's
`memory_breakdown()` keys. Assumptions, as the engine builds things from a ds_config: one
optimizer param group holding every trainable parameter; an Adam-like optimizer keeping
`state_bytes` (8: two fp32 moments) per element plus a 4-byte `step` tensor per stepped tensor;
master weights in fp32 for 16-bit training, none for fp32 (the optimizer steps the parameters).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ...comm.collectives import CommPolicy
from ...comm.topology import AxisGroup
from ...config.sections import OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig
from ...offload.optimizer_offload import Segment, cut_sub_groups
from ...zero.gather import BATCH_ELEMENTS
from ...zero.layout import bucket_ranges, build_layout
from ...zero.param_shards import Unit
from ...zero.unit_plan import FROZEN, plan_units
from .model import ModelShape
from .parts import Option, Part

STEP_BYTES = 4  # torch's Adam keeps `step` as a 0-dim fp32 tensor per stepped tensor
_SWAP_ALIGN = 4096  # NVMe swap buffers: each tensor starts at a multiple of this (O_DIRECT)


@dataclass(frozen=True)
class StateContext:
    shape: ModelShape
    zero: ZeroConfig
    world: int
    dtype: torch.dtype  # the training dtype of parameters and gradients
    accelerator: str = "cuda"
    state_bytes: int = 8  # optimizer state bytes per element (Adam: two fp32 moments)

    @property
    def k(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def sixteen_bit(self) -> bool:
        return self.k < 4


def model_state_parts(ctx: StateContext, option: Option) -> list[Part]:
    """The steady, step and stage-specific backward parts of `option` (activations excluded)."""
    # The section's stage decides defaults such as overlap_comm; the option's stage is the one that runs.
    ctx = replace(ctx, zero=ctx.zero.model_copy(update={"stage": option.stage}))
    if option.stage == 0:
        parts = _stage0(ctx)
    elif option.stage in (1, 2):
        parts = _stage12(ctx, option)
    else:
        parts = _stage3(ctx, option)
    return parts


def _stage0(ctx: StateContext) -> list[Part]:
    numel, k = ctx.shape.numel, ctx.k
    parts = [Part("parameters", "device", "steady", k * numel), Part("gradients", "device", "steady", k * numel),
             Part("frozen_parameters", "device", "steady", k * ctx.shape.frozen_numel),  # apart in the engine's report
             Part("master_weights", "device", "steady", 4 * numel if ctx.sixteen_bit else 0),
             Part("optimizer_states", "device", "steady", ctx.state_bytes * numel + STEP_BYTES * len(ctx.shape.trainable))]
    if ctx.sixteen_bit:
        parts.append(Part("fp32_gradients", "device", "step", 4 * numel))  # each master's fp32 copy of its gradient
    return parts


def _stage12(ctx: StateContext, option: Option) -> list[Part]:
    k, zero = ctx.k, ctx.zero
    layout = build_layout(list(ctx.shape.trainable), ctx.world)
    size = layout.partition_size
    grads = k * (size if option.stage == 2 else layout.padded_numel)
    parts = [Part("parameters", "device", "steady", k * (layout.padded_numel + ctx.shape.frozen_numel)),
             Part("gradients", "device", "steady", grads)]
    staging = 0
    if option.stage == 2:  # staging buffers of the bucket size, pooled: the one filling and the one in flight
        ranges = [(s, e) for s, e in bucket_ranges(layout, zero.reduce_bucket_size)
                  if any(s <= slot.offset < e for slot in layout.slots)]
        pooled = 2 if zero.overlap_comm_resolved and len(ranges) > 1 else 1
        staging = k * pooled * max(e - s for s, e in ranges)
    parts.append(Part("gradient_buckets", "device", "steady", staging))  # stage 1 reduces its kept gradients in place
    if ctx.accelerator == "cuda":  # NCCL all-gathers from a copy of this rank's partition, a chunk at a time
        parts.append(Part("allgather_staging", "device", "step", k * min(size, zero.allgather_bucket_size)))
    return parts + _optimizer_parts(ctx, option, [[_segment(size)]], runs=1)


def _stage3(ctx: StateContext, option: Option) -> list[Part]:
    k = ctx.k
    units = stage3_units(ctx)
    trainable = [u for u in units if u.group_key != FROZEN]
    moved = option.offload_param != "none"
    resident = [u for u in units if u.persistent or not moved]
    offloaded = [u for u in units if not u.persistent and moved]
    parts = [Part("parameters", "device", "steady", k * sum(u.partition_size for u in resident)),
             Part("persistent_parameters", "device", "steady", k * sum(u.full_numel for u in units if u.persistent)),
             Part("gradients", "device", "steady", k * sum(u.partition_size for u in trainable)),
             Part("gathered_parameters_peak", "device", "backward", k * gathered_peak(ctx.zero, units)),
             Part("gradient_buckets_peak", "device", "backward", k * staging_peak(ctx.zero, trainable))]
    if offloaded and option.offload_param == "cpu":
        parts.append(Part("cpu_parameters", "host", "steady", k * sum(u.partition_size for u in offloaded)))
    elif offloaded:
        largest = max(u.partition_size for u in offloaded) * k
        parts += [Part("cpu_parameters", "host", "steady", 0),
                  Part("nvme_parameters", "nvme", "steady", k * sum(u.partition_size for u in offloaded)),
                  Part("cpu_parameter_swap_buffers", "host", "steady", _param_buffer_count(ctx.zero) * _aligned(largest))]
    # Runs: trainable units whose shards share a buffer (offload_param puts persistent ones apart).
    persistent = [u for u in trainable if u.persistent]
    rest = [u for u in trainable if not u.persistent]
    runs = [r for r in ([persistent, rest] if moved else [trainable]) if r]
    swapped = option.offload_param == "nvme"
    segments = [[_segment(sum(u.partition_size for u in run))] if not (swapped and run is rest)
                else [_segment(u.partition_size, splittable=False) for u in run] for run in runs]
    return parts + _optimizer_parts(ctx, option, [[s for group in segments for s in group]], runs=len(runs))


def _param_buffer_count(zero: ZeroConfig) -> int:
    return (zero.offload_param or OffloadParamConfig()).buffer_count


def _optimizer_parts(ctx: StateContext, option: Option, groups: list[list[Segment]], runs: int) -> list[Part]:
    """Master weights, optimizer states and (16-bit) the fp32 gradient copies at the step: on the device,
    or with `offload_optimizer` in host memory or NVMe with their staging and swap buffers."""
    numel = sum(seg.numel for group in groups for seg in group)
    if option.offload_optimizer == "none":
        parts = [Part("master_weights", "device", "steady", 4 * numel if ctx.sixteen_bit else 0),
                 Part("optimizer_states", "device", "steady", ctx.state_bytes * numel + STEP_BYTES * runs)]
        if ctx.sixteen_bit:
            parts.append(Part("fp32_gradients", "device", "step", 4 * numel))
        return parts
    section = ctx.zero.offload_optimizer
    sub = [sum(n for _, _, n in pieces) for group in groups
           for pieces in cut_sub_groups(group, ctx.zero.sub_group_size)]
    in_place = [len(pieces) == 1 and ctx.accelerator == "cpu" and ctx.k == 4 for group in groups
                for pieces in cut_sub_groups(group, ctx.zero.sub_group_size)]
    staged = [n for n, free in zip(sub, in_place) if not free] or [0]
    if option.offload_optimizer == "cpu":
        # a CPU device stages every sub-group at once; a GPU two at a time (one copying while one steps)
        slots = sum(staged) if ctx.accelerator == "cpu" else min(2, len(staged)) * max(staged)
        return [Part("master_weights", "device", "steady", 0), Part("optimizer_states", "device", "steady", 0),
                Part("cpu_master_weights", "host", "steady", 4 * numel),
                Part("cpu_optimizer_states", "host", "steady", ctx.state_bytes * numel + STEP_BYTES * len(sub)),
                Part("cpu_gradient_staging", "host", "steady", 4 * slots)]
    footprints = [_aligned(4 * n) * (1 + ctx.state_bytes // 4) for n in sub]
    buffers = max(1, (section or OffloadOptimizerConfig()).buffer_count)
    return [Part("master_weights", "device", "steady", 0), Part("optimizer_states", "device", "steady", 0),
            Part("cpu_swap_buffers", "host", "steady", buffers * max(footprints)),
            Part("cpu_gradient_staging", "host", "steady", 4 * max(staged)),
            Part("nvme_master_weights", "nvme", "steady", 4 * numel),
            Part("nvme_optimizer_states", "nvme", "steady", sum(footprints) - 4 * numel)]


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _SWAP_ALIGN) * _SWAP_ALIGN


def _segment(numel: int, splittable: bool = True) -> Segment:
    grad = torch.empty(numel, device="meta")
    return Segment(grad, grad if splittable else None)


class _Unmanaged:
    """The manager of units planned only to be measured: nothing is ever gathered or touched."""

    def touched(self, param: Any) -> None:
        raise RuntimeError("a planned unit was touched")

    def touched_data(self, param: Any) -> None:
        pass

    def refresh_masters(self, unit: Unit) -> None:
        pass

    def release_unit(self, unit: Unit) -> None:
        pass


_UNMANAGED = _Unmanaged()


def stage3_units(ctx: StateContext) -> list[Unit]:
    """Stage 3's units of the model, as `ParameterManager` plans them (one trainable group, the rest frozen)."""
    zero = ctx.zero
    axis = AxisGroup(None, tuple(range(ctx.world)), 0)
    plan = plan_units(ctx.shape.module, {p: 0 for _, p in ctx.shape.trainable}, lambda key: axis, _UNMANAGED,
                      persistence_threshold=zero.param_persistence_threshold,
                      model_persistence_threshold=zero.model_persistence_threshold, leaf_spec=zero.leaf_module,
                      granularity_threshold=zero.module_granularity_threshold, offload=None,
                      policy=CommPolicy(False, False))
    return plan.units


def gathered_peak(zero: ZeroConfig, units: list[Unit]) -> int:
    """Elements of non-persistent units gathered at once (an estimate of `gathered_parameters_peak`).

    A unit used in forward stays gathered until its backward while its reuse distance is within
    `stage3_max_reuse_distance` and the gathered total within `stage3_max_live_parameters`; prefetch
    adds up to `stage3_prefetch_bucket_size` ahead. A model under both limits stays gathered whole.
    """
    sizes = [u.full_numel for u in units if not u.persistent]
    if not sizes:
        return 0
    total, largest = sum(sizes), max(sizes)
    if total <= min(zero.max_live_parameters, zero.max_reuse_distance):
        return total
    return min(total, max(largest + zero.prefetch_bucket_size, min(zero.max_live_parameters, zero.max_reuse_distance) + largest))


def staging_peak(zero: ZeroConfig, trainable: list[Unit]) -> int:
    """Elements of stage 3's gradient staging at once: the persistent unit's bucket (filled all through
    backward) and the two largest others (one filling, one being reduced), bucketed as the strategy does."""
    cap = min(zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.max_live_parameters)
    limit = min(cap // 2, BATCH_ELEMENTS)
    persistent = sum(u.full_numel for u in trainable if u.persistent)
    rest = [u.full_numel for u in trainable if not u.persistent]
    buckets, end = [], len(rest)
    while end > 0:
        start, full = end - 1, rest[end - 1]
        while start > 0 and full < limit and full + rest[start - 1] <= cap // 2:
            start -= 1
            full += rest[start]
        buckets.append(full)
        end = start
    largest = sorted(buckets, reverse=True)[:2 if zero.overlap_comm_resolved else 1]
    return persistent + sum(largest)
