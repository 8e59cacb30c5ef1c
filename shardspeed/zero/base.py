"""The one interface every ZeRO stage implements, and the gradient arithmetic they share.

The engine owns the order of a training step; a strategy owns where parameters, gradients and
optimizer states live and how gradients are combined across data-parallel ranks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ..comm.topology import AxisGroup

# DeepSpeed and torch both add this to the norm before dividing, so a zero norm never divides by 0.
CLIP_EPS = 1e-6


@dataclass(frozen=True)
class StepResult:
    applied: bool  # False when an overflow skipped the step
    overflow: bool
    grad_norm: float  # global norm of the unscaled gradients, before clipping


@dataclass(frozen=True)
class NormScope:
    """How far a gradient norm reaches beyond the data-parallel axis (model parallelism).

    Under pipeline or tensor parallelism one model replica spans several ranks, so the norm that
    clipping and the overflow check use adds their squares over `group`. A gradient that two of
    them hold is counted by one only: `counted_elsewhere` lists this rank's parameters that
    another rank of `group` counts (a tied weight's copy on a later stage, the layer norms and
    biases every tensor-parallel rank replicates). Summing over the group also carries an inf/nan
    on one rank to all, so every rank skips an overflowing step together.
    """

    group: dist.ProcessGroup | None = None  # None: the replica is this rank alone
    counted_elsewhere: frozenset[torch.Tensor] = field(default_factory=frozenset)  # tied weights: found by attribute name

    @property
    def spans_ranks(self) -> bool:
        return self.group is not None or bool(self.counted_elsewhere)


@dataclass(frozen=True)
class ParamGroupComm:
    """The process group each optimizer param group's gradients are reduced over and its states
    partitioned across: `data` for all, unless `per_group[g]` names another (DeepSpeed's MoE param
    groups, marked `"moe": True`, use the expert-data-parallel group).

    `norm_extra[g]`, where given, is the group a param group's squared gradient norm is summed over
    after its own: expert parameters differ across the expert-parallel ranks, so their part of the
    global norm needs that second sum; dense parameters must not take it (they would count twice).
    """

    data: AxisGroup
    per_group: tuple[AxisGroup | None, ...] = ()
    norm_extra: tuple[AxisGroup | None, ...] = ()

    def axis(self, g: int) -> AxisGroup:
        found = self.per_group[g] if g < len(self.per_group) else None
        return found if found is not None else self.data

    def axes(self, groups: int) -> list[AxisGroup]:
        return [self.axis(g) for g in range(groups)]

    def extra(self, g: int) -> AxisGroup | None:
        return self.norm_extra[g] if g < len(self.norm_extra) else None

    def average_over(self, g: int) -> int:
        """The ranks param group g's summed gradients are divided by: always the data-parallel size. An
        expert's gradient, summed over its expert-data group, already holds every token of its expert
        group (the all-to-all brought them), so that sum over the data-parallel size is the same
        average as plain data parallelism gives."""
        return self.data.size


class ZeroStrategy(Protocol):
    """What the engine asks of a stage. One object per engine, chosen by `build_zero_strategy`."""

    replicated: bool  # True when every rank's state_dict() is the same (only rank 0 saves it)
    partitions_parameters: bool  # True when no rank holds whole parameters (stage 3)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer whose param_groups the LR schedule drives (read-only here: each
        stage's own attribute is narrower, None or always an optimizer)."""

    def prepare_backward(self, boundary: bool) -> None:
        """Before a backward: whether this micro step ends an accumulation window."""

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Backward of `loss` (already divided by the accumulation steps), scaled for fp16."""

    def step(self, max_norm: float) -> StepResult:
        """At a boundary: unscale, detect overflow on any rank, clip, step, publish updated parameters."""

    def zero_grad(self) -> None:
        """Forget accumulated gradients (after a step)."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizer-side state this rank holds, for checkpoints (see `universal`)."""

    def sync_masters_from_model(self) -> None:
        """Refresh fp32 master weights from the model's (just loaded) parameters."""

    def load_universal(self, universal: dict[str, Any]) -> None:
        """Load weights and optimizer states given per parameter name (`universal.merge_shards`)."""

    def module_state_dict(self, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
        """The module's whole weights (stage 3: gathered, collective; on data-parallel rank 0 only, {} elsewhere)."""

    def load_module_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load whole weights into the module (stage 3: into every rank's shards)."""

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, gradients, master_weights, optimizer_states."""

    def close(self) -> None:
        """Remove hooks from the module and free what the strategy holds (the engine is being destroyed)."""


@dataclass(frozen=True)
class NormPiece:
    """Gradients whose squares add into the global norm, and how far they must be summed: over
    `axis` (disjoint partitions; None when every rank of it holds the same values already), then
    over `extra` (ParamGroupComm.norm_extra)."""

    grads: list[torch.Tensor]
    axis: AxisGroup | None = None
    extra: AxisGroup | None = None


def grad_norm(pieces: list[NormPiece], model_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The fp32 L2 norm of all pieces' gradients: each piece's squares summed over its groups (one
    collective per distinct pair of groups), then across `model_group` (the rest of the replica)."""
    sums: dict[tuple[int, int], tuple[torch.Tensor, AxisGroup | None, AxisGroup | None]] = {}
    for piece in pieces:
        key = (id(piece.axis), id(piece.extra))
        squared = _squares(piece.grads)
        if key in sums:
            squared = squared + sums[key][0]
        sums[key] = (squared, piece.axis, piece.extra)
    total: torch.Tensor | None = None
    for squared, axis, extra in sums.values():
        for group in (axis, extra):
            if group is not None and group.size > 1:
                dist.all_reduce(squared, group=group.group)
        total = squared if total is None else total + squared
    if total is None:
        total = torch.zeros((), dtype=torch.float32)
    if model_group is not None:
        dist.all_reduce(total, group=model_group)
    return total.sqrt()


# 16-bit gradients are normed in pieces of at most this many elements: on the CPU each piece is
# upcast to fp32 on its own, so the temporary is 4 MiB, not twice the gradients' size.
NORM_PIECE = 1 << 20


def _squares(grads: list[torch.Tensor]) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    pieces = [piece for g in grads for piece in (g.reshape(-1).split(NORM_PIECE) if g.dtype != torch.float32 and
                                                 g.numel() > NORM_PIECE else (g,))]
    norms = torch._foreach_norm(pieces, 2, dtype=torch.float32)
    return torch.stack(norms).square().sum()


def scaled_backward(loss: torch.Tensor, scale: float, retain_graph: bool = False) -> None:
    """Backward of `loss * scale` (fp16 loss scaling; a unit scale adds no multiply)."""
    (loss * scale if scale != 1.0 else loss).backward(retain_graph=retain_graph)


def clip_factor(norm: float, max_norm: float) -> float:
    """The factor gradients are multiplied by so their global norm is at most `max_norm` (0: off)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPS))


def unscale_and_clip_factor(pieces: list[NormPiece], loss_scaler: Any, check_overflow: bool, max_norm: float,
                            model_group: dist.ProcessGroup | None = None) -> tuple[StepResult, float]:
    """The step's verdict from the gradient pieces, and the factor to multiply them by.

    An inf/nan on any rank makes the summed norm inf/nan on every rank, so all ranks skip together.
    """
    scale = loss_scaler.loss_scale
    norm = grad_norm(pieces, model_group).item() / scale
    overflow = check_overflow and not math.isfinite(norm)
    loss_scaler.update_scale(overflow)
    if overflow:
        return StepResult(applied=False, overflow=True, grad_norm=norm), 0.0
    return StepResult(applied=True, overflow=False, grad_norm=norm), clip_factor(norm, max_norm) / scale


def step_partitions(optimizer: torch.optim.Optimizer, masters: Sequence[torch.Tensor], grads: list[torch.Tensor],
                    pieces: list[NormPiece], loss_scaler: Any, check_overflow: bool, max_norm: float,
                    model_group: dist.ProcessGroup | None = None) -> StepResult:
    """Unscale, check overflow, clip on the global norm (over `pieces`) and step fp32 masters from
    their gradient partitions."""
    grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
    result, factor = unscale_and_clip_factor(pieces, loss_scaler, check_overflow, max_norm, model_group)
    if not result.applied:
        return result
    for master, grad in zip(masters, grads):
        master.grad = grad
    if factor != 1.0:
        torch._foreach_mul_(grads, factor)
    optimizer.step()
    for master in masters:
        master.grad = None
    return result


def tensor_bytes(tensors: Any) -> int:
    """Bytes of every tensor found in a (nested) container."""
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0
