"""A shared-memory all-reduce (sum) for small CPU tensors among ranks on one host: tensor-parallel decode.

A decode step of a tensor-parallel model all-reduces a few kilobytes twice per layer. Over gloo each
call costs 270-330 µs here (a TCP round trip through the loopback), which made shardspeed's CPU
TP 2 three times slower than DeepSpeed's, whose `deepspeed_shm_comm` op does the same in ~3 µs
(benchmarks/RESULTS.md, issue 15). This is the same idea in Python, with no compiled op:

- One shared mapping per group, a file in /dev/shm that the group's first rank creates and every
  rank maps; it is unlinked as soon as all have it, so nothing is left behind however they exit.
- Each rank owns one counter (on its own cache line) and one slot per parity. Call number `s` copies
  the input into this rank's slot of parity `s % 2`, stores `s` in its counter, waits until every
  counter reads at least `s`, then sums the group's slots, in rank order, into the input (so every
  rank gets the same bits). Two parities make a second barrier unnecessary: a rank can only write
  parity `s % 2` again at call `s + 2`, after every rank has announced `s + 1`, that is after every
  rank has finished reading call `s`.
- The ordering relies on x86-64's: stores are seen in program order, loads are not reordered with
  loads. Elsewhere (or with ranks on several hosts, tensors off the CPU, or bigger than a slot) the
  call is the group's ordinary `dist.all_reduce`.
- A rank that waits longer than `timeout` seconds for another raises an error naming the ranks that
  have not arrived, instead of hanging.
"""
from __future__ import annotations

import mmap
import os
import platform
import socket
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from .comms_logging import comms_logger
from .topology import AxisGroup

_LINE = 64  # bytes: one counter per cache line, so ranks do not write the same line
SLOT_BYTES = 1 << 20  # per rank and parity; a decode step's LM-head logits (batch 8 x 32k fp32) fit
_SPINS_BEFORE_YIELD = 2000


class ShmAllReduceTimeout(RuntimeError):
    """A rank waited longer than the timeout for the others to reach the same all-reduce."""


def _host_key() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


class ShmAllReduce:
    """Sum-all-reduce in place over `group`'s ranks through shared memory (collective to construct)."""

    def __init__(self, group: AxisGroup, slot_bytes: int = SLOT_BYTES, timeout: float = 300.0) -> None:
        self.group, self.slot_bytes, self.timeout = group, slot_bytes, timeout
        self.world, self.rank = group.size, group.rank
        self._seq = 0
        self._mm: mmap.mmap | None = None
        self._counters: memoryview | None = None
        self._slots: torch.Tensor | None = None
        self.active = self.world > 1 and self._usable() and self._map()

    # ---- set-up ------------------------------------------------------------------------------------
    def _usable(self) -> bool:
        """Every rank is on this host and x86-64 (agreed by all: the answer must be the same everywhere)."""
        hosts: list[object] = [None] * self.world
        dist.all_gather_object(hosts, (_host_key(), platform.machine()), group=self.group.group)
        return all(h == hosts[0] for h in hosts) and platform.machine() in ("x86_64", "AMD64")

    def _map(self) -> bool:
        header = self.world * _LINE
        size = header + 2 * self.world * self.slot_bytes
        path = [None]
        if self.rank == 0:
            folder = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
            candidate = folder / f"shardspeed_allreduce_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            try:
                with open(candidate, "wb") as f:
                    f.truncate(size)
                path[0] = str(candidate)  # type: ignore[call-overload]
            except OSError:
                path[0] = None
        dist.broadcast_object_list(path, src=self.group.ranks[0], group=self.group.group)
        mapped = 0
        if path[0] is not None:
            try:
                with open(path[0], "r+b") as f:
                    self._mm = mmap.mmap(f.fileno(), size)
                mapped = 1
            except OSError:
                self._mm = None
        ok = torch.tensor([mapped], dtype=torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=self.group.group)  # also: every rank has mapped it
        if self.rank == 0 and path[0] is not None:
            Path(path[0]).unlink(missing_ok=True)
        dist.barrier(group=self.group.group)  # every rank returns with the name already gone
        if not int(ok):
            self.close()
            return False
        assert self._mm is not None
        self._counters = memoryview(self._mm)[:header].cast("q")  # counter of rank r at index r * _LINE // 8
        data = torch.frombuffer(self._mm, dtype=torch.uint8, offset=header, count=2 * self.world * self.slot_bytes)
        self._slots = data.view(2, self.world, self.slot_bytes)
        return True

    # ---- the collective --------------------------------------------------------------------------------
    def fits(self, x: torch.Tensor) -> bool:
        # A tensor autograd is recording goes through dist.all_reduce, which autograd lets modify it in place.
        return (self.active and x.device.type == "cpu" and x.is_contiguous()
                and x.numel() * x.element_size() <= self.slot_bytes
                and not (x.requires_grad and torch.is_grad_enabled()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; returns `x`."""
        if not self.fits(x):
            dist.all_reduce(x, group=self.group.group)
            return x
        logged = comms_logger.enabled and (comms_logger.prof_all or "all_reduce" in comms_logger.prof_ops)
        start = time.perf_counter() if logged else 0.0
        self._seq += 1
        seq, nbytes = self._seq, x.numel() * x.element_size()
        assert self._slots is not None and self._counters is not None  # `active`
        slots = self._slots[seq % 2]
        slots[self.rank, :nbytes].copy_(x.reshape(-1).view(torch.uint8))
        self._counters[self.rank * (_LINE // 8)] = seq
        self._wait_for(seq)
        parts = slots[:, :nbytes].view(x.dtype).view(self.world, *x.shape)
        if self.world == 2:
            torch.add(parts[0], parts[1], out=x)
        else:
            torch.sum(parts, dim=0, out=x)
        if logged:
            comms_logger.append("all_reduce", "all_reduce", (time.perf_counter() - start) * 1000.0, nbytes, self.world)
        return x

    def _wait_for(self, seq: int) -> None:
        counters, stride = self._counters, _LINE // 8
        assert counters is not None
        spins, deadline = 0, 0.0
        for r in range(self.world):
            while counters[r * stride] < seq:
                spins += 1
                if spins > _SPINS_BEFORE_YIELD:
                    os.sched_yield()  # more ranks than cores: let the one we wait for run
                    if not deadline:
                        deadline = time.monotonic() + self.timeout
                    elif time.monotonic() > deadline:
                        late = [self.group.ranks[q] for q in range(self.world) if counters[q * stride] < seq]
                        raise ShmAllReduceTimeout(
                            f"rank {self.group.ranks[self.rank]} waited {self.timeout:.0f} s in tensor-parallel all-reduce "
                            f"#{seq} for rank(s) {late}, which never reached it")

    def close(self) -> None:
        if self._mm is not None:
            counters = getattr(self, "_counters", None)
            if counters is not None:
                counters.release()
            self._counters = None
            self._slots = None
            try:
                self._mm.close()
            except BufferError:  # a tensor still views the mapping; it goes with the process
                pass
            self._mm = None
        self.active = False
