"""Stage 0: plain data parallelism. Every rank holds everything; gradients are averaged by a
bucketed all-reduce that overlaps the backward pass.

With bf16/fp16 the model holds 16-bit parameters and the optimizer steps fp32 master copies;
the updated masters are copied back into the model after each step.
"""
from __future__ import annotations

from typing import Any

import torch

from ..config.sections import ZeroConfig
from ..optim.precision import Precision
from .base import NormPiece, NormScope, ParamGroupComm, StepResult, scaled_backward, tensor_bytes, unscale_and_clip_factor
from .module_only import drop_frozen
from .param_names import checkpoint_names
from .reducer import Bucket, GradientReducer, ReduceOptions, contiguous_members
from .universal import restore_hyperparams, shard_header, snapshot_state


class ReplicatedOptimizer:
    """The stage-0 `ZeroStrategy`: replicated states, all-reduced gradients."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        zero: ZeroConfig,
        precision: Precision,
        comm: ParamGroupComm,
        reduce: ReduceOptions = ReduceOptions(),
        norm_scope: NormScope = NormScope(),
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.comm = comm
        self.norm_scope = norm_scope
        self.loss_scaler = precision.loss_scaler
        self.check_overflow = precision.check_overflow
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.names = checkpoint_names(module)
        self.group_of = {p: g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.masters = _attach_master_weights(optimizer, self.params)
        self.reducer = GradientReducer(self._buckets(zero.reduce_bucket_size), reduce)

    def _buckets(self, cap: int) -> list[Bucket]:
        """Per optimizer param group (each reduces over its own process group), trainable params in
        reverse order (the order backward usually produces them), in buffers of at most `cap` elements.
        A trainable parameter the optimizer does not hold is still averaged, with group 0."""
        buckets = []
        for g, axis in enumerate(self.comm.axes(len(self.optimizer.param_groups))):
            ordered = [p for p in reversed(self.params) if self.group_of.get(p, 0) == g]
            for members in contiguous_members(ordered, cap):
                numel = members[-1].offset + members[-1].param.numel()
                buffer = torch.zeros(numel, dtype=members[0].param.dtype, device=members[0].param.device)
                buckets.append(Bucket(axis, members, numel, spans=None, buffer=buffer, average_over=self.comm.average_over(g)))
        return buckets

    def prepare_backward(self, boundary: bool) -> None:
        self.reducer.prepare(boundary)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        scaled_backward(loss, self.loss_scaler.loss_scale, retain_graph)

    def step(self, max_norm: float) -> StepResult:
        grads = self._master_grads()
        result, factor = unscale_and_clip_factor(self._norm_pieces(grads), self.loss_scaler, self.check_overflow,
                                                 max_norm, self.norm_scope.group)
        if not result.applied:
            self._drop_master_grads()
            return result
        if factor != 1.0:
            torch._foreach_mul_(list(grads.values()), factor)
        self.optimizer.step()
        if self.masters:
            torch._foreach_copy_([p.data for p in self.masters], list(self.masters.values()))
            self._drop_master_grads()
        return result

    def _norm_pieces(self, grads: dict[torch.nn.Parameter, torch.Tensor]) -> list[NormPiece]:
        """Per param group, its gradients less those another rank counts in the norm. After the
        all-reduce every rank of a group holds the same gradients (an inf/nan anywhere is everywhere),
        so no data-parallel sum: only the expert and model-parallel parts need a collective."""
        elsewhere = self.norm_scope.counted_elsewhere
        by_group: dict[int, list[torch.Tensor]] = {}
        for p, grad in grads.items():
            if p not in elsewhere:
                by_group.setdefault(self.group_of.get(p, 0), []).append(grad)
        return [NormPiece(by_group.get(g, []), None, self.comm.extra(g)) for g in range(len(self.optimizer.param_groups))]

    def _master_grads(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """The gradient each stepped tensor takes, by model parameter (an fp32 copy for 16-bit ones)."""
        # `.grad` set to None outside the engine (module.zero_grad()) and not produced since: the
        # bucket still holds that parameter's (all-reduced, zero) gradient, as DDP would give it.
        self.reducer.rebind()
        if not self.masters:
            return {p: p.grad for p in self.params if p.grad is not None}
        grads: dict[torch.nn.Parameter, torch.Tensor] = {}
        for param, master in self.masters.items():
            assert param.grad is not None, f"parameter `{self.names[param]}` has no gradient"  # rebound above
            grads[param] = param.grad.float()
            master.grad = grads[param]
        return grads

    def _drop_master_grads(self) -> None:
        for master in self.masters.values():
            master.grad = None

    def zero_grad(self) -> None:
        self.reducer.zero()

    replicated = True  # every rank holds the same state: rank 0 alone saves it
    partitions_parameters = False

    def _stepped(self) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
        """(name, model param, tensor the optimizer steps) for every trainable parameter."""
        return [(self.names[p], p, self.masters.get(p, p)) for p in self.params]

    def state_dict(self) -> dict[str, Any]:
        """Every parameter whose group this rank leads: all of them on data-parallel rank 0; experts split
        over expert-parallel ranks on the first rank of their expert-data group (`merge_shards` joins them)."""
        params = {}
        for name, param, target in self._stepped():
            if self.comm.axis(self.group_of.get(param, 0)).rank != 0:
                continue
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

    def module_state_dict(self, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
        return drop_frozen(self.module, self.module.state_dict(), exclude_frozen)

    def load_module_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        self.module.load_state_dict(state, strict=strict)

    def close(self) -> None:
        self.reducer.remove()

    def memory_breakdown(self) -> dict[str, int]:
        return {
            "parameters": tensor_bytes(self.params),
            "gradients": self.reducer.kept_bytes(),
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
