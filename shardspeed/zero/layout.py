"""Flat, padded layouts of a parameter group and its equal partitions across data-parallel ranks.

A group's trainable parameters are laid end to end in *reverse* registration order (the order
backward usually produces their gradients, so gradient buckets fill front to back), padded so
the total divides into `world` equal partitions whose size is a multiple of `ALIGN` elements.
Rank i owns elements [i*S, (i+1)*S).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Partition sizes are multiples of this many elements (keeps every partition 16-byte aligned for
# any dtype up to fp32, which vectorised kernels and NCCL prefer).
ALIGN = 4


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in its group's flat buffer."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class GroupLayout:
    slots: tuple[Slot, ...]
    world: int
    partition_size: int

    @property
    def padded_numel(self) -> int:
        return self.partition_size * self.world

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    def partition(self, rank: int) -> tuple[int, int]:
        """[start, end) of rank's partition in the flat buffer."""
        return rank * self.partition_size, (rank + 1) * self.partition_size


def build_layout(named: list[tuple[str, torch.nn.Parameter]], world: int) -> GroupLayout:
    slots, offset = [], 0
    for name, p in reversed(named):
        slots.append(Slot(name, offset, p.numel(), tuple(p.shape)))
        offset += p.numel()
    unit = ALIGN * world
    padded = max(unit, -(-offset // unit) * unit)
    return GroupLayout(tuple(slots), world, padded // world)


def bucket_ranges(layout: GroupLayout, bucket_elements: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges covering the padded buffer, cut at parameter boundaries.

    A bucket never holds more than `bucket_elements`, except a parameter bigger than that, which
    is a bucket of its own. The padding tail joins the last bucket.
    """
    ranges, start = [], 0
    for slot in layout.slots:
        if slot.end - start > bucket_elements and slot.offset > start:
            ranges.append((start, slot.offset))  # close before this parameter would overflow it
            start = slot.offset
        if slot.end - start >= bucket_elements:
            ranges.append((start, slot.end))
            start = slot.end
    if start < layout.padded_numel:
        if ranges and start == layout.numel:
            ranges[-1] = (ranges[-1][0], layout.padded_numel)  # padding rides with the last bucket
        else:
            ranges.append((start, layout.padded_numel))
    return ranges
