"""The small device seam: CUDA when present, CPU otherwise.

Only what the runtime needs: the device for a local rank, synchronisation for timers, pinned host
memory, and peak-memory readings. CUDA-only paths go through here so their logic runs on CPU too.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accelerator:
    name: str  # "cuda" or "cpu"

    @property
    def communication_backend(self) -> str:
        return "nccl" if self.name == "cuda" else "gloo"

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cuda", local_rank) if self.name == "cuda" else torch.device("cpu")

    # DeepSpeed's accelerator names that transformers and accelerate call.
    def device_name(self, device_index: int | None = None) -> str:
        """'cuda' or 'cuda:<i>'; 'cpu'."""
        return self.name if device_index is None or self.name == "cpu" else f"{self.name}:{device_index}"

    def current_device_name(self) -> str:
        return f"cuda:{torch.cuda.current_device()}" if self.name == "cuda" else "cpu"

    def communication_backend_name(self) -> str:
        return self.communication_backend

    def synchronize(self) -> None:
        if self.name == "cuda":
            torch.cuda.synchronize()

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """Page-locked copy where it speeds host-device copies; the tensor itself on a CPU-only machine."""
        return tensor.pin_memory() if self.name == "cuda" else tensor

    def max_memory_allocated(self) -> int:
        """Peak device bytes (CUDA) or peak resident bytes of this process (CPU)."""
        if self.name == "cuda":
            return torch.cuda.max_memory_allocated()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def get_accelerator() -> Accelerator:
    return Accelerator("cuda" if torch.cuda.is_available() else "cpu")
