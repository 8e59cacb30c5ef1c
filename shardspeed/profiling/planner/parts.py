"""The vocabulary of a plan: an option (stage, offloads, checkpointing) and the memory parts it holds.

A part is bytes of one kind, on one tier, during one phase of training:
- tier: `device` (one accelerator; on a CPU machine, the rank's share of host memory), `host`
  (host memory one rank holds: offloaded states, pinned staging and swap buffers, the model while
  it is loaded), `nvme` (one rank's swap files);
- phase: `steady` (held from initialize to the end), `backward` (alive during forward and
  backward only: activations, gathered stage-3 parameters, stage-3 gradient staging), `step` (alive
  during the optimizer step only: fp32 copies of 16-bit gradients, all-gather staging), `init`
  (alive only while the model is built and initialize runs: the whole model in fp32).

A tier's peak is `max(init, steady + max(backward, step))`. What an allocator keeps resident from the
backward pass into the step is a step part of its own: glibc keeps the heap pages of blocks under its
mmap threshold (`activations_retained`, on a CPU machine), while the CUDA caching allocator frees its
cached blocks before it lets an allocation fail, so on a GPU the step may use what activations used.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Tier = Literal["device", "host", "nvme"]
Phase = Literal["steady", "backward", "step", "init"]
Device = Literal["none", "cpu", "nvme"]
Stage = Literal[0, 1, 2, 3]
TIERS: tuple[Tier, ...] = ("device", "host", "nvme")


@dataclass(frozen=True)
class Part:
    name: str  # the engine's `memory_breakdown()` key where the engine reports it
    tier: Tier
    phase: Phase
    nbytes: int


@dataclass(frozen=True, order=True)
class Option:
    """One way to train: a ZeRO stage, where optimizer states and (stage 3) parameters live, checkpointing."""

    stage: Stage
    offload_optimizer: Device = "none"
    offload_param: Device = "none"
    checkpointing: bool = False

    @property
    def label(self) -> str:
        text = f"stage {self.stage}"
        if self.offload_optimizer != "none":
            moved = "optimizer+params" if self.offload_param != "none" else "optimizer"
            where = self.offload_optimizer if self.offload_param in ("none", self.offload_optimizer) else \
                f"{self.offload_optimizer}/{self.offload_param}"
            text += f", {moved} -> {where}"
        return text + (", checkpointing" if self.checkpointing else "")

    def zero_section(self) -> dict[str, object]:
        """The `zero_optimization` keys that select this option."""
        section: dict[str, object] = {"stage": self.stage}
        if self.offload_optimizer != "none":
            section["offload_optimizer"] = {"device": self.offload_optimizer}
        if self.offload_param != "none":
            section["offload_param"] = {"device": self.offload_param}
        return section


def options(stages: Iterable[Stage] = (0, 1, 2, 3), nvme: bool = False,
            checkpointing: Iterable[bool] = (False, True)) -> list[Option]:
    """Every option worth planning: each stage without offload; stages 1-3 with the optimizer on the
    host (and on NVMe with `nvme`); stage 3 with its parameters offloaded alongside."""
    homes: list[Device] = ["cpu", "nvme"] if nvme else ["cpu"]
    found = []
    for ckpt in checkpointing:
        for stage in stages:
            found.append(Option(stage, checkpointing=ckpt))
            if stage == 0:
                continue
            for home in homes:
                found.append(Option(stage, home, checkpointing=ckpt))
                if stage == 3:
                    found.append(Option(stage, home, home, checkpointing=ckpt))
    return found


def tier_peak(parts: Iterable[Part], tiers: Iterable[Tier]) -> int:
    """`max(init, steady + max(backward, step))` over the parts on `tiers` (see the module docstring)."""
    chosen = set(tiers)
    total = {"steady": 0, "backward": 0, "step": 0, "init": 0}
    for part in parts:
        if part.tier in chosen:
            total[part.phase] += part.nbytes
    return max(total["init"], total["steady"] + max(total["backward"], total["step"]))
