"""The optimizer step of one pipeline stage, clipped on the gradient norm of the whole pipeline.

A ZeRO strategy computes the norm of the gradients it holds, summed over the data-parallel axis:
one stage's share, L. The pipeline's norm G adds the stages' squared norms over the pipe axis,
counting a tied weight once (the copies on later stages are left out), and every stage must reach
the same overflow verdict. Without changing the strategies, both come through their `step`:

- clipping: the strategy multiplies by `min(1, threshold / (L + eps))`; this stage passes the
  threshold for which that is exactly `min(1, max_norm / (G + eps))`, the same number on every
  stage (so tied copies stay bitwise identical);
- overflow: when G is inf/nan but this stage's gradients are finite, one gradient element is set
  to nan, so the strategy skips the step and lowers the loss scale with every other stage.

For that, L must be the very number the strategy will compute: `_strategy_norm_inputs` mirrors
where each strategy keeps its reduced gradients and in which order it norms them (stage 0:
`param.grad`, or fp32 copies in master order; stage 1: its flat partitions). That is the one
coupling to `shardspeed.zero`; a norm hook there would replace this module (docs/pipeline.md).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from ..comm.topology import AxisGroup
from ..zero.base import CLIP_EPS, StepResult, clip_factor, grad_norm


def _strategy_norm_inputs(strategy: Any) -> tuple[list[torch.Tensor], Any]:
    """The gradients (in order) and group a strategy's `step` computes its norm over."""
    if hasattr(strategy, "reducer"):  # stage 0 (ReplicatedOptimizer.step / _master_grads)
        if strategy.masters:
            return [p.grad.float() for p in strategy.masters], None
        return [p.grad for p in strategy.params if p.grad is not None], None
    if hasattr(strategy, "grads") and hasattr(strategy, "layouts"):  # stage 1 (PartitionedOptimizer.step)
        group = strategy.dp.group if strategy.dp.size > 1 else None
        if strategy.offload is not None:
            return list(strategy.grads.partitions), group
        return [g if g.dtype == torch.float32 else g.float() for g in strategy.grads.partitions], group
    raise NotImplementedError(f"pipeline clipping does not know where {type(strategy).__name__} keeps its gradients")


def _duplicate_squares(strategy: Any, duplicates: set[torch.nn.Parameter]) -> float:
    """Squared norm of the reduced gradients of `duplicates` (tied copies), summed over data parallel."""
    if not duplicates:
        return 0.0
    if hasattr(strategy, "reducer"):
        return _squares([p.grad for p in strategy.params if p in duplicates and p.grad is not None])
    names = {slot.name for layout, params in zip(strategy.layouts, strategy.group_params)
             for slot, p in zip(layout.slots, params) if p in duplicates}
    views = []
    for partition, layout in zip(strategy.grads.partitions, strategy.layouts):
        start, end = layout.partition(strategy.dp.rank)
        for slot in layout.slots:
            lo, hi = max(start, slot.offset), min(end, slot.end)
            if slot.name in names and lo < hi:
                views.append(partition[lo - start:hi - start])
    total = torch.tensor([_squares(views)], dtype=torch.float64)
    if strategy.dp.size > 1:
        dist.all_reduce(total, group=strategy.dp.group)
    return total.item()


def step_with_pipeline_norm(strategy: Any, duplicates: set[torch.nn.Parameter], pipe: AxisGroup,
                            loss_scale: float, max_norm: float) -> StepResult:
    """Unscale, agree on overflow, clip on the pipeline-wide norm and step this stage (collective over `pipe`)."""
    grads, group = _strategy_norm_inputs(strategy)
    stage_norm = grad_norm(grads, group=group).item() / loss_scale  # bit for bit what strategy.step computes
    squares = torch.tensor([stage_norm ** 2 - _duplicate_squares(strategy, duplicates) / loss_scale ** 2], dtype=torch.float64)
    if pipe.size > 1:
        dist.all_reduce(squares, group=pipe.group)
    total = squares.item()
    norm = math.sqrt(max(total, 0.0)) if math.isfinite(total) else float("nan")
    if not math.isfinite(norm):
        if math.isfinite(stage_norm):
            _poison(strategy)
        threshold = max_norm
    else:
        threshold = _threshold(stage_norm, norm, max_norm)
    result = strategy.step(threshold)
    return StepResult(applied=result.applied, overflow=result.overflow, grad_norm=norm)


def _threshold(stage_norm: float, norm: float, max_norm: float) -> float:
    """The t with clip_factor(stage_norm, t) == clip_factor(norm, max_norm), exactly where a nearby double has it."""
    if max_norm <= 0:
        return 0.0
    target = clip_factor(norm, max_norm)
    if target == 1.0:
        return max(max_norm, stage_norm + CLIP_EPS)
    t = target * (stage_norm + CLIP_EPS)
    for candidate in _neighbours(t, 4):
        if candidate > 0 and clip_factor(stage_norm, candidate) == target:
            return candidate
    return t  # within a double's rounding of the target (the tensors multiply by an fp32 of it)


def _neighbours(x: float, steps: int) -> list[float]:
    out, up, down = [x], x, x
    for _ in range(steps):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        out += [up, down]
    return out


def _squares(tensors: list[torch.Tensor]) -> float:
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return 0.0
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).double().square().sum().item()


def _poison(strategy: Any) -> None:
    """Make this stage's strategy see a non-finite gradient (another stage overflowed)."""
    if hasattr(strategy, "reducer"):
        grads = [p.grad for p in strategy.params if p.grad is not None and p.grad.numel()]
    else:
        grads = [g for g in strategy.grads.partitions if g.numel()]
    if grads:
        grads[0].view(-1)[0] = float("nan")
