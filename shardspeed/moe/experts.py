"""DeepSpeed's `deepspeed.moe.experts.Experts`: this rank's share of an MoE layer's experts."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _first(out: Tensor | tuple[Tensor, ...]) -> Tensor:
    # An expert returning (output, bias), as Megatron's MLPs do: DeepSpeed keeps element 0.
    return out[0] if isinstance(out, tuple) else out


class Experts(nn.Module):
    """`num_local_experts` deep copies of `expert` in `deepspeed_experts` (state-dict keys
    `deepspeed_experts.<local id>.*`, as DeepSpeed's). Every expert parameter is marked as DeepSpeed
    marks it: `allreduce = False` (not averaged over data parallel) and `group_name = expert_group_name`
    (averaged over that name's expert-data-parallel group instead)."""

    def __init__(self, expert: nn.Module, num_local_experts: int = 1, expert_group_name: str | None = None) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList([copy.deepcopy(expert) for _ in range(num_local_experts)])
        self.num_local_experts = num_local_experts
        for local in self.deepspeed_experts:
            for param in local.parameters():
                setattr(param, "allreduce", False)
                setattr(param, "group_name", expert_group_name)

    def forward_each(self, chunks: Sequence[Tensor]) -> list[Tensor]:
        """Expert i on `chunks[i]` (rows [n_i, M]; n_i may be 0, which gives zero gradients, not none)."""
        if len(chunks) != self.num_local_experts:
            raise ValueError(f"{len(chunks)} chunks for {self.num_local_experts} local experts")
        return [_first(expert(chunk)) for chunk, expert in zip(chunks, self.deepspeed_experts)]

    def forward(self, inputs: Tensor) -> Tensor:
        """DeepSpeed's layout: `inputs` [P, num_local_experts * C, ...] (or any tensor whose dim 1 splits
        evenly by expert): dim 1 is cut into one chunk per local expert and the outputs concatenated."""
        return torch.cat(self.forward_each(inputs.chunk(self.num_local_experts, dim=1)), dim=1)
