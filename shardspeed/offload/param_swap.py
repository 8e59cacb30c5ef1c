"""ZeRO-Infinity parameter offload: stage-3 partitions on NVMe, moved through a fixed pool of buffers.

Each stage-3 unit (see `zero.param_shards`) whose parameters are offloaded keeps its partition in a
region of one swap file per rank instead of in memory. Gathering the unit reads the partition into
one of `buffer_count` aligned buffers (asynchronously: a prefetched unit's read overlaps the
modules that run before it), the gather copies it out, and the buffer goes back to the pool.
Updated partitions (after an optimizer step) are copied into a pool buffer and written back
asynchronously; a read of a region waits for an earlier write to it (`SwapSpace` orders them).

So the memory these partitions take is the pool, `buffer_count` buffers of the largest unit's
partition, whatever the model's size. Where a unit's partition is its whole weights (its group has
one rank) and the gathered weights are not recorded by autograd (generation under `no_grad`), the
unit keeps the buffer its partition was read into as its gathered weights until it is released
(or a forward with autograd on uses it: the weights then move to a copy of their own): no copy and
no new allocation. Prefetching only starts reads into free pool buffers; a read or write
that is needed now while every buffer is taken uses a buffer of its own, dropped afterwards, instead
of failing. DeepSpeed's `buffer_size` is the most elements a buffer may
hold: a unit whose partition is bigger is a configuration error (raise the size, or use smaller
leaf modules). DeepSpeed's `max_in_cpu` (a host cache of partitions) is accepted but no cache is
kept: every fetch reads from the drive.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Hashable

import torch

from ..config.errors import ConfigError
from ..config.sections import AioConfig, OffloadParamConfig
from .aio import AsyncIO
from .swap_space import SwapSpace, aligned_empty

_ALIGN = 4096


class ParamSwapper:
    """Swap file, buffer pool and in-flight writes for one rank's offloaded parameter partitions."""

    def __init__(self, regions: dict[Hashable, tuple[int, torch.dtype]], cfg: OffloadParamConfig, aio: AioConfig,
                 rank: int, pin: bool) -> None:
        nbytes = {key: numel * _itemsize(dtype) for key, (numel, dtype) in regions.items()}
        largest_key = max(regions, key=lambda k: regions[k][0])
        largest = regions[largest_key][0]
        if largest > cfg.buffer_size:
            raise ConfigError(
                f"`zero_optimization.offload_param.buffer_size` is {cfg.buffer_size} elements but the largest parameter "
                f"partition to swap ({largest_key}) has {largest}; raise buffer_size to at least {largest}")
        if cfg.buffer_count < 1:
            raise ConfigError("`zero_optimization.offload_param.buffer_count` must be at least 1")
        self.aio = AsyncIO.from_config(aio)
        self.space: SwapSpace | None = SwapSpace(cfg.nvme_path, "param", rank, nbytes, self.aio,
                               config_key="zero_optimization.offload_param.nvme_path")
        self._pin = pin
        size = -(-max(nbytes.values()) // _ALIGN) * _ALIGN
        self.buffers = [aligned_empty(size, pin=pin) for _ in range(cfg.buffer_count)]
        self._pooled = {b.data_ptr() for b in self.buffers}
        self._free: deque[torch.Tensor] = deque(self.buffers)
        self._writes: deque[tuple[torch.Tensor, Any]] = deque()
        self.swapped_bytes = sum(nbytes.values())

    # ---- the pool ------------------------------------------------------------------------------
    def has_free(self) -> bool:
        """A pool buffer can be had without waiting on a gather (free, or held only by a write)."""
        return bool(self._free) or bool(self._writes)

    def _acquire(self, nbytes: int) -> torch.Tensor:
        """A pool buffer, or (every one held by a read in flight or a unit's weights) one of our own of `nbytes`."""
        while not self._free and self._writes:
            self._retire_write()
        return self._free.popleft() if self._free else aligned_empty(-(-nbytes // _ALIGN) * _ALIGN, pin=self._pin)

    def release(self, buf: torch.Tensor) -> None:
        if buf.data_ptr() in self._pooled:
            self._free.append(buf)

    def _retire_write(self) -> None:
        buf, request = self._writes.popleft()
        request.wait()
        self.release(buf)

    # ---- reads and writes -----------------------------------------------------------------------
    def read(self, key: Hashable, numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Start reading a partition: (pool buffer to release after use, the partition view, request)."""
        nbytes = numel * _itemsize(dtype)
        buf = self._acquire(nbytes)
        view = buf[:nbytes].view(dtype)
        return buf, view, self._open_space().read(key, view)

    def read_now(self, key: Hashable, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A partition as a tensor of its own (for rare whole-value edits; not from the pool)."""
        out = torch.empty(numel, dtype=dtype)
        self._open_space().read(key, out).wait()
        return out

    def write(self, key: Hashable, values: torch.Tensor, dtype: torch.dtype) -> None:
        """Write a partition (converted to `dtype`) back, asynchronously, through a pool buffer."""
        nbytes = values.numel() * _itemsize(dtype)
        buf = self._acquire(nbytes)
        view = buf[:nbytes].view(dtype)
        view.copy_(values.reshape(-1))
        self._writes.append((buf, self._open_space().write(key, view)))

    def _open_space(self) -> SwapSpace:
        assert self.space is not None, "parameter swap used after close()"
        return self.space

    def flush(self) -> None:
        while self._writes:
            self._retire_write()

    def close(self) -> None:
        if self.space is not None:
            self.flush()
            self.space.close()
            self.aio.close()
            self.space = None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()
