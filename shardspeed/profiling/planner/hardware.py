"""The machine a plan is for, and byte-size spellings (`80GB`, `1.5TiB`, `2e9`).

Every number is stated, never measured behind the user's back: `Hardware()` is a DGX-like default
and `Hardware.this_machine()` reads this machine's devices and memory once. Bandwidths are bytes
per second, `device_flops` is what a device achieves on the model's matmuls (not its datasheet
peak), memory is bytes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Literal

GiB = 2 ** 30
TiB = 2 ** 40

_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6, "g": 10 ** 9, "gb": 10 ** 9,
          "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": GiB, "tib": TiB}


def parse_bytes(text: str | int | float) -> int:
    """`80GB` (10^9), `80GiB` (2^30), `1.5e9`, `512` -> bytes; a `/s` suffix (bandwidths) is allowed."""
    if isinstance(text, (int, float)):
        return int(text)
    found = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)(?:/s)?\s*", text.lower())
    if not found or found.group(2) not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: write e.g. 80GB, 80GiB, 2.5e9 or 512MiB")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def format_bytes(n: float) -> str:
    """Bytes in binary units, three significant figures (`1.23 GiB`)."""
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if abs(value) < 999.5 else f"{value:.0f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Hardware:
    """Nodes of `gpus_per_node` accelerators each (one rank per accelerator).

    `accelerator="cpu"`: each rank is a process on the host and its "device" memory *is* host
    memory, so the device and host tiers are added up against `host_memory`; `gpu_memory` is
    unused there.
    """

    gpus_per_node: int = 8
    nodes: int = 1
    gpu_memory: int = 80 * GiB  # per accelerator
    host_memory: int = 1 * TiB  # per node
    nvme_space: int = 0  # per node; 0: NVMe options are not planned
    nvme_bandwidth: float = 3e9  # per node, read or write
    pcie_bandwidth: float = 25e9  # per accelerator, each direction
    device_flops: float = 400e12  # achieved per accelerator (an H100 at ~40% of its dense bf16 peak)
    intra_node_bandwidth: float = 150e9  # per accelerator, collective bus bandwidth inside a node
    inter_node_bandwidth: float = 25e9  # per accelerator, collective bus bandwidth across nodes
    host_adam_rate: float = 1e9  # optimizer elements per second one rank's CPU step updates (offload)
    device_reserved: int = 2 * GiB  # per accelerator: the CUDA context and allocator slack, never usable
    accelerator: Literal["cuda", "cpu"] = "cuda"
    # CPU ranks: glibc serves blocks under its mmap threshold from the heap, whose pages stay resident once
    # freed (above it a freed block goes back to the OS). 128 KiB is glibc's starting value; its default
    # dynamic threshold then rises with the blocks freed, so fix it (MALLOC_MMAP_THRESHOLD_=131072) for the
    # resident size to follow the plan.
    mmap_threshold: int = 128 * 1024

    def __post_init__(self) -> None:
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise ValueError(f"gpus_per_node and nodes must be at least 1, got {self.gpus_per_node} and {self.nodes}")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def device_budget(self) -> int:
        """Bytes one rank may use on its accelerator (cpu: its share of the host)."""
        if self.accelerator == "cpu":
            return self.host_memory // self.gpus_per_node
        return max(0, self.gpu_memory - self.device_reserved)

    def with_budget(self, per_rank: int) -> Hardware:
        """The same machine with `per_rank` bytes per rank: of its accelerator, or on a CPU machine of the host."""
        if self.accelerator == "cpu":
            return replace(self, host_memory=per_rank * self.gpus_per_node)
        return replace(self, gpu_memory=per_rank + self.device_reserved)

    @classmethod
    def this_machine(cls, ranks_per_node: int | None = None, nodes: int = 1, nvme_path: str | None = None) -> Hardware:
        """This machine: its CUDA devices (or `ranks_per_node` processes on the CPU), its available
        host memory, and the free space under `nvme_path`. Speeds keep their defaults; on a CPU
        machine a rank's FLOP/s is a rough 2e10 per process."""
        import shutil

        import psutil
        import torch

        nvme = shutil.disk_usage(nvme_path).free if nvme_path else 0
        host = int(psutil.virtual_memory().available)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            return cls(gpus_per_node=ranks_per_node or torch.cuda.device_count(), nodes=nodes,
                       gpu_memory=int(props.total_memory), host_memory=host, nvme_space=nvme)
        local = ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        return cls(gpus_per_node=local, nodes=nodes, host_memory=host, nvme_space=nvme, accelerator="cpu",
                   device_flops=2e10, pcie_bandwidth=float("inf"), intra_node_bandwidth=5e9, device_reserved=0)

    def describe(self) -> str:
        nodes = f"{self.nodes} node{'s' if self.nodes > 1 else ''}"
        if self.accelerator == "cpu":
            ranks = f"{nodes} x {self.gpus_per_node} CPU rank{'s' if self.gpus_per_node > 1 else ''}"
            return f"{ranks}, host {format_bytes(self.host_memory)} per node" + self._nvme()
        return (f"{nodes} x {self.gpus_per_node} GPU{'s' if self.gpus_per_node > 1 else ''} of "
                f"{format_bytes(self.gpu_memory)}, host {format_bytes(self.host_memory)} per node" + self._nvme())

    def _nvme(self) -> str:
        return f", NVMe {format_bytes(self.nvme_space)} at {self.nvme_bandwidth / 1e9:.3g} GB/s" if self.nvme_space else ""
