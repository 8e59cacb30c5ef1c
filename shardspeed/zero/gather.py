"""Gathering stage-3 units: one collective for one or several units.

Each unit's whole tensors lie in one buffer, every parameter padded to `world * shard` elements
(rank r's shard at `full_offset + r * shard`). A batch lays its units' buffers end to end, so one
collective fills them all; each unit's `full` is then a view of the batch buffer.

- All-reduce implementation (gloo): the buffer holds this rank's shards in place and zeros
  everywhere else (only those regions are written: no memset of the whole buffer), and the sum
  over ranks is the gathered buffer, exactly.
- All-gather implementation (NCCL): the units' partitions (end to end) are all-gathered rank by
  rank into a landing buffer, then one `split_with_sizes_copy` moves every shard into place.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .param_shards import Unit


def _in_memory(unit: Unit) -> torch.Tensor:
    assert unit.partition is not None, "a unit whose shards are on the drive is gathered from `sources`"
    return unit.partition


class GatherBatch:
    """Units gathered by one collective; `wait()` finishes it and points their parameters at the weights."""

    def __init__(self, units: list[Unit], work: Any, landing: torch.Tensor | None) -> None:
        self.units = units
        self._work = work
        self._landing = landing

    @classmethod
    def launch(cls, units: Sequence[Unit], sources: Sequence[torch.Tensor] | None = None) -> "GatherBatch":
        """Start gathering `units` (same group, dtype and device; shards in memory, or in `sources`)."""
        units = list(units)
        first = units[0]
        axis, policy, device, dtype = first.dp, first.policy, first.compute_device, first.dtype
        parts = list(sources) if sources is not None else [_in_memory(u) for u in units]
        parts = [p if p.device == device else p.to(device, non_blocking=True) for p in parts]  # offload_param: host shards
        buffer = torch.empty(sum(u.full_numel for u in units), dtype=dtype, device=device)
        at = 0
        for unit in units:
            unit.full = buffer[at:at + unit.full_numel]
            at += unit.full_numel
        if not policy.communicates(axis):
            for unit, part in zip(units, parts):
                _place_own(unit, part)  # world 1: the shards are the whole tensors (plus zero padding)
            batch = cls(units, None, None)
        elif policy.gather_by_all_reduce:
            for unit, part in zip(units, parts):
                _place_own(unit, part)
            batch = cls(units, dist.all_reduce(buffer, group=axis.group, async_op=True), None)
        else:
            source = parts[0] if len(parts) == 1 else torch.cat(parts)
            landing = torch.empty(axis.size * source.numel(), dtype=dtype, device=device)
            batch = cls(units, dist.all_gather_into_tensor(landing, source, group=axis.group, async_op=True), landing)
        for unit in units:
            unit._batch = batch
        if batch._work is None:
            batch.wait()
        return batch

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._landing is not None:
            self._copy_out(self._landing)
            self._landing = None
        for unit in self.units:
            if unit._batch is self:
                unit._batch = None
                unit.install()

    def _copy_out(self, landing: torch.Tensor) -> None:
        """[rank 0's shards | rank 1's | ...] into each parameter's whole (padded) tensor, in one op."""
        world = self.units[0].dp.size
        sizes, outs = [], []
        for unit in self.units:
            assert unit.full is not None
            for slot in unit.slots:
                sizes.append(slot.shard)
                outs.append(unit.full[slot.full_offset:slot.full_offset + slot.shard * world].view(world, slot.shard))
        torch.split_with_sizes_copy(landing.view(world, -1), sizes, dim=1, out=outs)


def _place_own(unit: Unit, part: torch.Tensor) -> None:
    """This rank's shards into their places in `unit.full`, zeros in every other rank's places."""
    full = unit.full
    assert full is not None
    plan = _own_regions(unit)
    if plan.zero:
        torch._foreach_zero_([full[lo:hi] for lo, hi in plan.zero])
    torch._foreach_copy_([full[lo:lo + n] for lo, _, n in plan.copy], [part[src:src + n] for _, src, n in plan.copy])


class _Regions:
    """Where one rank's shards go in a unit's whole buffer, and the other ranks' regions to zero
    (adjacent regions merged); computed once per unit."""

    def __init__(self, unit: Unit) -> None:
        rank, world = unit.dp.rank, unit.dp.size
        self.copy: list[tuple[int, int, int]] = []  # (offset in full, offset in partition, elements)
        self.zero: list[tuple[int, int]] = []
        for slot in unit.slots:
            start = slot.full_offset
            own = start + rank * slot.shard
            self._zero(start, own)
            self.copy.append((own, slot.offset, slot.shard))
            self._zero(own + slot.shard, start + world * slot.shard)

    def _zero(self, lo: int, hi: int) -> None:
        if lo >= hi:
            return
        if self.zero and self.zero[-1][1] == lo:
            self.zero[-1] = (self.zero[-1][0], hi)
        else:
            self.zero.append((lo, hi))


def _own_regions(unit: Unit) -> _Regions:
    if unit.own_regions is None:
        unit.own_regions = _Regions(unit)
    return unit.own_regions





# Consecutive units are gathered (and their gradients reduced) together until a batch holds about this
# many elements. Below it a collective's fixed cost dominates (gloo here, world 2: 0.5-1 ms for up to
# 128k fp32 elements, 3.5 ms for 1M); above it, separate collectives let compute on the first units
# overlap the gathering of the next ones, which one model-sized collective would not.
BATCH_ELEMENTS = 1 << 20


def launch_gathers(units: list[Unit]) -> None:
    """Start gathering `units`: consecutive units that share a group, dtype and device go in batches of
    about BATCH_ELEMENTS (a bigger unit alone), one collective each."""
    runs: dict[tuple[int, torch.dtype, torch.device], list[Unit]] = {}
    for unit in units:
        runs.setdefault((id(unit.dp.group), unit.dtype, unit.compute_device), []).append(unit)
    for run in runs.values():
        batch: list[Unit] = []
        size = 0
        for unit in run:
            batch.append(unit)
            size += unit.full_numel
            if size >= BATCH_ELEMENTS:
                GatherBatch.launch(batch)
                batch, size = [], 0
        if batch:
            GatherBatch.launch(batch)


def gather_in_batches(units: list[Unit], bucket_elements: int) -> None:
    """Gather `units` now, in collectives of at most `bucket_elements` elements each (a bigger unit
    alone); NVMe-swapped units one by one (each needs a swap buffer of its own)."""
    batch: list[Unit] = []
    size = 0
    for unit in units:
        if unit.fetching:
            continue
        if not unit.batchable:
            unit.gather()
            continue
        if batch and size + unit.full_numel > bucket_elements:
            launch_gathers(batch)
            batch, size = [], 0
        batch.append(unit)
        size += unit.full_numel
    launch_gathers(batch)
    for unit in units:
        unit.finish_gather()
__all__ = ["BATCH_ELEMENTS", "GatherBatch", "gather_in_batches", "launch_gathers"]
