"""Tiny deterministic models and data for equivalence tests."""
from __future__ import annotations

import torch
from torch import nn

IN, HIDDEN, CLASSES = 16, 32, 4


class TinyNet(nn.Module):
    """Three linear layers; optionally a parameter that never gets a gradient and a frozen one."""

    def __init__(self, unused: bool = False, frozen: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)
        self.register_buffer("shift", torch.zeros(IN))
        if unused:
            self.unused = nn.Linear(HIDDEN, HIDDEN)
        if frozen:
            self.fc2.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.fc1(x + self.shift))
        h = torch.nn.functional.gelu(self.fc2(h))
        logits = self.head(h).float()
        return torch.nn.functional.cross_entropy(logits, y)


class Deep(nn.Module):
    """12 layers, ~50k parameters, so padding is negligible and there are a dozen buckets or units."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.Tanh()) for _ in range(12)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).float().pow(2).mean()


def make_batches(steps: int, global_batch: int, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(global_batch, IN, generator=g), torch.randint(0, CLASSES, (global_batch,), generator=g))
            for _ in range(steps)]


def rank_slice(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int, micro: int, gas: int, m: int):
    """Micro batch `m` of rank `rank` out of a global batch laid out as [micro-step][rank][sample]."""
    x, y = batch
    start = (m * world + rank) * micro
    return x[start:start + micro], y[start:start + micro]
