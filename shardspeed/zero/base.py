"""The one interface every ZeRO stage implements, and the gradient arithmetic they share.

The engine owns the order of a training step; a strategy owns where parameters, gradients and
optimizer states live and how gradients are combined across data-parallel ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

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
    counted_elsewhere: frozenset[torch.nn.Parameter] = field(default_factory=frozenset)

    @property
    def spans_ranks(self) -> bool:
        return self.group is not None or bool(self.counted_elsewhere)


class ZeroStrategy(Protocol):
    """What the engine asks of a stage. One object per engine, chosen by `build_zero_strategy`."""

    optimizer: torch.optim.Optimizer  # the torch optimizer whose param_groups the LR schedule drives

    def prepare_backward(self, boundary: bool) -> None:
        """Before a backward: whether this micro step ends an accumulation window."""

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        """Backward of `loss` (already divided by the accumulation steps), scaled for fp16."""

    def step(self, max_norm: float) -> StepResult:
        """At a boundary: unscale, detect overflow on any rank, clip, step, publish updated parameters."""

    def zero_grad(self) -> None:
        """Forget accumulated gradients (after a step)."""

    replicated: bool  # True when every rank's state_dict() is the same (only rank 0 saves it)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer-side state this rank holds, for checkpoints (see `universal`)."""

    def sync_masters_from_model(self) -> None:
        """Refresh fp32 master weights from the model's (just loaded) parameters."""

    def load_universal(self, universal: dict[str, Any]) -> None:
        """Load weights and optimizer states given per parameter name (`universal.merge_shards`)."""

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes this rank holds: parameters, gradients, master_weights, optimizer_states."""

    def close(self) -> None:
        """Remove hooks from the module (the engine is being destroyed)."""


def grad_norm(grads: list[torch.Tensor], group: dist.ProcessGroup | None = None,
              model_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The L2 norm of all `grads` in fp32; the squared sums are first added across `group` (data
    parallel) and then across `model_group` (the rest of the model replica), where given."""
    if grads:
        # Accumulates in fp32 without an fp32 copy of 16-bit gradients (that copy would be 2x their size at once).
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        squared = torch.stack(norms).square().sum()
    else:
        squared = torch.zeros((), dtype=torch.float32)
    if group is not None:
        dist.all_reduce(squared, group=group)
    if model_group is not None:
        dist.all_reduce(squared, group=model_group)
    return squared.sqrt()


def scaled_backward(loss: torch.Tensor, scale: float, retain_graph: bool = False) -> None:
    """Backward of `loss * scale` (fp16 loss scaling; a unit scale adds no multiply)."""
    (loss * scale if scale != 1.0 else loss).backward(retain_graph=retain_graph)


def clip_factor(norm: float, max_norm: float) -> float:
    """The factor gradients are multiplied by so their global norm is at most `max_norm` (0: off)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPS))


def unscale_and_clip_factor(grads: list[torch.Tensor], loss_scaler: Any, group: dist.ProcessGroup | None,
                            check_overflow: bool, max_norm: float,
                            model_group: dist.ProcessGroup | None = None) -> tuple[StepResult, float]:
    """The step's verdict from disjoint gradient partitions, and the factor to multiply them by.

    Partitions are disjoint: their squared norms add up across ranks to the global norm, and an
    inf/nan on any rank makes the sum inf/nan on every rank, so all ranks skip together.
    """
    scale = loss_scaler.loss_scale
    norm = grad_norm(grads, group=group, model_group=model_group).item() / scale
    overflow = check_overflow and not math.isfinite(norm)
    loss_scaler.update_scale(overflow)
    if overflow:
        return StepResult(applied=False, overflow=True, grad_norm=norm), 0.0
    return StepResult(applied=True, overflow=False, grad_norm=norm), clip_factor(norm, max_norm) / scale


def step_partitions(optimizer: torch.optim.Optimizer, masters: list[torch.Tensor], grads: list[torch.Tensor],
                    loss_scaler: Any, group: dist.ProcessGroup | None, check_overflow: bool, max_norm: float,
                    norm_grads: list[torch.Tensor] | None = None, model_group: dist.ProcessGroup | None = None) -> StepResult:
    """Unscale, check overflow, clip on the global norm and step fp32 masters from disjoint gradient partitions.

    `norm_grads`: what the norm is taken over when it is not all of `grads` (see NormScope).
    """
    grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
    result, factor = unscale_and_clip_factor(grads if norm_grads is None else norm_grads, loss_scaler, group,
                                             check_overflow, max_norm, model_group)
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
