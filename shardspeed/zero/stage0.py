"""Stage 0: plain data parallelism. Every rank holds everything; gradients are averaged by a
bucketed all-reduce that overlaps the backward pass.

With bf16/fp16 the model holds 16-bit parameters and the optimizer steps fp32 master copies;
the updated masters are copied back into the model after each step.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..comm.grad_buckets import GradientBucketReducer
from ..comm.topology import AxisGroup
from ..runtime.loss_scaler import LossScaler
from .base import NormScope, StepResult, clip_factor, grad_norm, scaled_backward, tensor_bytes
from .universal import restore_hyperparams, shard_header, snapshot_state


class ReplicatedOptimizer:
    """The stage-0 `ZeroStrategy`: replicated states, all-reduced gradients."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: AxisGroup,
        loss_scaler: LossScaler,
        bucket_elements: int,
        check_overflow: bool,
        comm_dtype: torch.dtype | None = None,
        predivide: float | None = None,
        norm_scope: NormScope = NormScope(),
    ) -> None:
        self.optimizer = optimizer
        self.norm_scope = norm_scope
        self.loss_scaler = loss_scaler
        self.check_overflow = check_overflow
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.names = {p: n for n, p in module.named_parameters()}
        self.masters = _attach_master_weights(optimizer, self.params)
        self.reducer = GradientBucketReducer(self.params, dp, bucket_elements, comm_dtype, predivide)

    def prepare_backward(self, boundary: bool) -> None:
        self.reducer.prepare(sync=boundary)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        scaled_backward(loss, self.loss_scaler.loss_scale, retain_graph)

    def step(self, max_norm: float) -> StepResult:
        grads = self._master_grads()
        scale = self.loss_scaler.loss_scale
        # Gradients are identical on every data-parallel rank after the all-reduce (an inf/nan
        # anywhere becomes inf/nan everywhere): only the model-parallel part of the norm needs a collective.
        norm = grad_norm(self._norm_grads(grads), model_group=self.norm_scope.group).item() / scale
        overflow = self.check_overflow and not math.isfinite(norm)
        self.loss_scaler.update_scale(overflow)
        if overflow:
            self._drop_master_grads()
            return StepResult(applied=False, overflow=True, grad_norm=norm)
        factor = clip_factor(norm, max_norm) / scale
        if factor != 1.0:
            torch._foreach_mul_(grads, factor)
        self.optimizer.step()
        if self.masters:
            torch._foreach_copy_([p.data for p in self.masters], list(self.masters.values()))
            self._drop_master_grads()
        return StepResult(applied=True, overflow=False, grad_norm=norm)

    def _norm_grads(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """`grads` (as `_master_grads` returns them) less those another rank counts in the norm."""
        elsewhere = self.norm_scope.counted_elsewhere
        if not elsewhere:
            return grads
        with_grad = [p for p in self.params if p.grad is not None] if not self.masters else list(self.masters)
        return [g for p, g in zip(with_grad, grads) if p not in elsewhere]

    def _master_grads(self) -> list[torch.Tensor]:
        if not self.masters:
            return [p.grad for p in self.params if p.grad is not None]
        for param, master in self.masters.items():
            master.grad = param.grad.float()
        return [m.grad for m in self.masters.values()]

    def _drop_master_grads(self) -> None:
        for master in self.masters.values():
            master.grad = None

    def zero_grad(self) -> None:
        self.reducer.zero()

    replicated = True  # every rank holds the same state: rank 0 alone saves it

    def _stepped(self) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
        """(name, model param, tensor the optimizer steps) for every trainable parameter."""
        return [(self.names[p], p, self.masters.get(p, p)) for p in self.params]

    def state_dict(self) -> dict[str, Any]:
        params = {}
        for name, _, target in self._stepped():
            state = self.optimizer.state.get(target, {})
            params[name] = {"fp32": target.detach().float().clone(), "state": snapshot_state(state)}
        return {**shard_header(self.optimizer, self.loss_scaler, "replicated"), "params": params}

    def sync_masters_from_model(self) -> None:
        with torch.no_grad():
            for param, master in self.masters.items():
                master.copy_(param.float())

    def load_universal(self, universal: dict[str, Any]) -> None:
        saved = universal["params"]
        for name, param, target in self._stepped():
            if name not in saved:
                raise KeyError(f"checkpoint has no optimizer state for parameter `{name}`")
            with torch.no_grad():
                target.copy_(saved[name]["fp32"])
                if target is not param:
                    param.copy_(target)
            state = {k: (v.clone().to(target.device) if torch.is_tensor(v) else v) for k, v in saved[name]["state"].items()}
            if state:
                self.optimizer.state[target] = state
        restore_hyperparams(self.optimizer, universal.get("hyperparams"))
        if universal.get("loss_scaler"):
            self.loss_scaler.load_state_dict(universal["loss_scaler"])

    def close(self) -> None:
        self.reducer.remove()

    def memory_breakdown(self) -> dict[str, int]:
        return {
            "parameters": tensor_bytes(self.params),
            "gradients": self.reducer.buffer_bytes(),
            "master_weights": tensor_bytes(list(self.masters.values())),
            "optimizer_states": tensor_bytes(list(self.optimizer.state.values())),
        }


def _attach_master_weights(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> dict[torch.nn.Parameter, torch.nn.Parameter]:
    """Give the optimizer fp32 copies of the trainable 16-bit params (mapping model param -> master)."""
    masters: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
    trainable = set(params)
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p in trainable and p.dtype in (torch.float16, torch.bfloat16):
                master = torch.nn.Parameter(p.detach().float().clone())
                if p in optimizer.state:
                    optimizer.state[master] = optimizer.state.pop(p)
                masters[p] = master
                group["params"][i] = master
    return masters
