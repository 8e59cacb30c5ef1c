"""NVMe homes for offloaded optimizer sub-groups: each sub-group's fp32 master and per-element optimizer
states in one region of a swap file, moved through a fixed pool of aligned buffers.

A buffer holds one sub-group laid out as [master | state 1 | state 2 | ...], each piece starting at a
multiple of 4096 bytes (O_DIRECT). While a sub-group is being stepped, its master Parameter and its
optimizer states are views of the buffer (`attach`); afterwards the states the optimizer made are
moved into the buffer, scalars (Adam's step) are kept in memory, and the buffer is written back
(`detach`, `write`). Until the first step writes states, only the master's bytes are read and written.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ..config.sections import AioConfig, OffloadOptimizerConfig
from .aio import AsyncIO, IORequest
from .swap_space import SwapSpace, aligned_empty

# Per-element tensors in a sub-group's swap buffer start at multiples of this many bytes (O_DIRECT).
_ALIGN_BYTES = 4096


class SwappedSubGroup(Protocol):
    numel: int
    master: torch.nn.Parameter
    scalars: dict[str, Any]
    has_state: bool


def per_element_state_layout(optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.dtype]]:
    """The state tensors the optimizer keeps per element (Adam: exp_avg, exp_avg_sq), found by one
    step of a throwaway 8-element parameter in a temporary param group. Any optimizer works."""
    probe = torch.nn.Parameter(torch.zeros(8))
    probe.grad = torch.full_like(probe, 1e-3)
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    optimizer.add_param_group({**group, "params": [probe]})
    try:
        optimizer.step()
        state = optimizer.state.get(probe, {})
        return [(k, v.dtype) for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.numel() == probe.numel()]
    finally:
        optimizer.param_groups.pop()
        optimizer.state.pop(probe, None)


class SubGroupSwap:
    """The swap file, buffer pool and in-flight writes of one rank's offloaded sub-groups (region i: sub-group i)."""

    def __init__(self, sub_groups: Sequence[SwappedSubGroup], optimizer: torch.optim.Optimizer, cfg: OffloadOptimizerConfig,
                 aio: AioConfig, rank: int, pin: bool, time: Callable[[str, bool], None]) -> None:
        self.optimizer = optimizer
        self.state_layout = per_element_state_layout(optimizer)
        self._time = time
        self.footprint = [self.layout(sg.numel)[1] for sg in sub_groups]
        self.aio = AsyncIO.from_config(aio)
        self.space = SwapSpace(cfg.nvme_path, "optimizer", rank, dict(enumerate(self.footprint)), self.aio,
                               fast_init=cfg.fast_init, config_key="zero_optimization.offload_optimizer.nvme_path")
        self.buffers = [aligned_empty(max(self.footprint), pin=pin) for _ in range(max(1, cfg.buffer_count))]
        self._free: deque[torch.Tensor] = deque(self.buffers)
        self._writes: deque[tuple[torch.Tensor, IORequest]] = deque()

    # ---- layout --------------------------------------------------------------------------------------
    def layout(self, numel: int) -> tuple[list[tuple[int, int]], int]:
        """(byte offset, bytes) of the master and each per-element state in a sub-group's buffer, and the total."""
        spans, offset = [], 0
        for dtype in [torch.float32, *(d for _, d in getattr(self, "state_layout", []))]:
            nbytes = numel * torch.empty(0, dtype=dtype).element_size()
            spans.append((offset, nbytes))
            offset += -(-nbytes // _ALIGN_BYTES) * _ALIGN_BYTES
        return spans, offset

    def views(self, sg: SwappedSubGroup, buf: torch.Tensor) -> list[torch.Tensor]:
        """The master and each per-element state of `sg`, as views of `buf`."""
        spans, _ = self.layout(sg.numel)
        dtypes = [torch.float32, *(d for _, d in self.state_layout)]
        return [buf[o:o + n].view(d) for (o, n), d in zip(spans, dtypes)]

    def state_bytes(self, i: int, sg: SwappedSubGroup) -> int:
        """Bytes of a sub-group's region to read or write: the master alone until states exist."""
        return self.footprint[i] if sg.has_state else sg.numel * 4

    # ---- the pool and the file -------------------------------------------------------------------------
    def has_free(self) -> bool:
        return bool(self._free)

    def acquire(self) -> torch.Tensor:
        while not self._free:
            self.retire_write()
        return self._free.popleft()

    def release(self, buf: torch.Tensor) -> None:
        self._free.append(buf)

    def read(self, i: int, sg: SwappedSubGroup) -> tuple[torch.Tensor, IORequest]:
        """Start reading sub-group i into a pool buffer."""
        buf = self.acquire()
        return buf, self.space.read(i, buf[:self.state_bytes(i, sg)])

    def write_now(self, i: int, buf: torch.Tensor, nbytes: int) -> None:
        self.space.write(i, buf[:nbytes]).wait()

    def write_behind(self, i: int, buf: torch.Tensor, nbytes: int) -> None:
        """Start writing sub-group i back; the buffer returns to the pool once the write is done."""
        self._writes.append((buf, self.space.write(i, buf[:nbytes])))

    def retire_write(self) -> None:
        buf, request = self._writes.popleft()
        self._time("swap_out_wait", True)
        request.wait()
        self._time("swap_out_wait", False)
        self._free.append(buf)

    def flush(self) -> None:
        while self._writes:
            self.retire_write()

    # ---- attaching a buffer to the optimizer ------------------------------------------------------------
    def attach(self, sg: SwappedSubGroup, buf: torch.Tensor) -> None:
        """Point the sub-group's master and states at its swap buffer."""
        views = self.views(sg, buf)
        sg.master.data = views[0]
        if sg.has_state:
            self.optimizer.state[sg.master] = {**sg.scalars, **{k: v for (k, _), v in zip(self.state_layout, views[1:])}}

    def detach(self, sg: SwappedSubGroup, buf: torch.Tensor) -> None:
        """Move states the optimizer created into the buffer (first step), keep scalars, drop the rest."""
        views = self.views(sg, buf)
        state = self.optimizer.state.pop(sg.master, {})
        for (key, _), view in zip(self.state_layout, views[1:]):
            if key in state and state[key].data_ptr() != view.data_ptr():
                view.copy_(state[key].reshape(-1))
        sg.scalars = {k: v for k, v in state.items() if k not in dict(self.state_layout)}
        sg.has_state = bool(state)
        sg.master.data = torch.empty(0, dtype=torch.float32)

    def stored(self, i: int, sg: SwappedSubGroup) -> tuple[torch.Tensor, dict[str, Any]]:
        """Sub-group i's master and states read from the drive, as tensors the caller may keep."""
        buf, request = self.read(i, sg)
        request.wait()
        views = [v.clone() for v in self.views(sg, buf)]
        self.release(buf)
        state = {**sg.scalars, **{k: v for (k, _), v in zip(self.state_layout, views[1:])}} if sg.has_state else {}
        return views[0], state

    # ---- reporting and teardown ---------------------------------------------------------------------------
    def memory_breakdown(self, masters: int) -> dict[str, int]:
        return {"cpu_swap_buffers": sum(b.numel() for b in self.buffers), "nvme_master_weights": masters,
                "nvme_optimizer_states": max(0, sum(self.footprint) - masters), "nvme_file": self.space.nbytes}

    def close(self) -> None:
        self.space.close()
        self.aio.close()
