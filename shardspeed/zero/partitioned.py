"""ZeRO stages 1 and 2: optimizer states (and, at stage 2, gradients) partitioned across ranks.

Before: every rank holds the whole model. After `PartitionedOptimizer(...)`:
- each parameter group's trainable parameters are views into one flat buffer (model dtype);
- rank i owns elements [i*S, (i+1)*S) of it: the optimizer steps only that partition, on fp32
  master weights (a copy for bf16/fp16; the flat buffer itself for fp32), so optimizer states are
  1/N of the model's;
- gradients are reduced to their owners (stage 1: from a full gradient buffer at the boundary;
  stage 2: every micro step, keeping only the owned partition), see `partitioned_grads`;
- after the step, updated partitions are all-gathered back into the flat buffers, in chunks of
  `allgather_bucket_size` elements per rank.
The torch optimizer is the user's (or the config's), untouched except that each param group now
holds one flat master partition: any `torch.optim.Optimizer` is partitioned the same way.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..comm.collectives import all_gather_partitions
from ..comm.topology import AxisGroup
from ..runtime.loss_scaler import LossScaler
from ..offload.optimizer_offload import OffloadedOptimizer, Segment
from .base import NormScope, StepResult, scaled_backward, step_partitions, tensor_bytes, unscale_and_clip_factor
from .layout import GroupLayout, build_layout
from .partitioned_grads import PartitionedGradients
from .universal import restore_hyperparams, shard_header, snapshot_state


class PartitionedOptimizer:
    """The stage-1/2 `ZeroStrategy`."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        dp: AxisGroup,
        loss_scaler: LossScaler,
        *,
        stage: int,
        reduce_bucket_size: int,
        allgather_bucket_size: int,
        reduce_scatter: bool,
        overlap_comm: bool,
        check_overflow: bool,
        comm_dtype: torch.dtype | None = None,
        predivide: float | None = None,
        offload: Callable[[list[list[Segment]]], OffloadedOptimizer] | None = None,
        norm_scope: NormScope = NormScope(),
    ) -> None:
        self.optimizer = optimizer
        self.norm_scope = norm_scope
        self.offloading = offload is not None
        self.dp = dp
        self.loss_scaler = loss_scaler
        self.check_overflow = check_overflow
        self.allgather_elements = max(1, allgather_bucket_size)
        names = {p: n for n, p in module.named_parameters()}
        self.module_params = list(module.parameters())
        self.layouts: list[GroupLayout] = []
        self.group_params: list[list[torch.nn.Parameter]] = []
        self.flat_params: list[torch.Tensor] = []
        self.masters: list[torch.nn.Parameter] = []
        self.frozen_in_groups: list[list[torch.nn.Parameter]] = []
        for group in optimizer.param_groups:
            self._partition_group(group, names)
        self.grads = PartitionedGradients(
            self.layouts, self.group_params, dp, reduce_bucket_size,
            partition_grads=stage == 2, reduce_scatter=reduce_scatter, overlap=overlap_comm,
            comm_dtype=comm_dtype, predivide=predivide,
        )
        self.norm_ranges = self._norm_ranges()
        # With offload, fp32 masters and optimizer states live in host memory (or on NVMe) instead.
        self.offload = offload([[Segment(grad, flat[s:e])] for grad, flat, (s, e) in zip(
            self.grads.partitions, self.flat_params, (l.partition(dp.rank) for l in self.layouts))]) if offload else None

    def _partition_group(self, group: dict[str, Any], names: dict[torch.nn.Parameter, str]) -> None:
        trainable = [p for p in group["params"] if p.requires_grad]
        if not trainable:
            raise ValueError("a ZeRO parameter group has no trainable parameters; drop the group")
        for p in trainable:
            if p not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model; ZeRO can only partition the model's parameters")
        # Flat order is reverse registration order; slots record it (see layout.build_layout).
        layout = build_layout([(names[p], p) for p in trainable], self.dp.size)
        ordered = list(reversed(trainable))
        flat = torch.zeros(layout.padded_numel, dtype=trainable[0].dtype, device=trainable[0].device)
        for slot, p in zip(layout.slots, ordered):
            if p.dtype != flat.dtype:
                raise ValueError(f"parameter `{slot.name}` is {p.dtype} but its group holds {flat.dtype}; ZeRO needs one dtype per group")
            flat[slot.offset:slot.end].copy_(p.data.reshape(-1))
            p.data = flat[slot.offset:slot.end].view_as(p)
        start, end = layout.partition(self.dp.rank)
        own = flat[start:end]
        master = None if self.offloading else torch.nn.Parameter(own if own.dtype == torch.float32 else own.float().clone())
        self.layouts.append(layout)
        self.group_params.append(ordered)
        self.flat_params.append(flat)
        self.masters.append(master)
        self.frozen_in_groups.append([p for p in group["params"] if not p.requires_grad])
        group["params"] = [master] if master is not None else []

    # ---- ZeroStrategy ------------------------------------------------------------------------
    def prepare_backward(self, boundary: bool) -> None:
        self.grads.prepare(boundary)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        scaled_backward(loss, self.loss_scaler.loss_scale, retain_graph)

    def _norm_ranges(self) -> list[tuple[int, int, int]] | None:
        """(group, lo, hi) of this rank's gradient partitions the norm covers: all but the slots of
        parameters another rank counts (NormScope); None when that is everything. Fixed by the layouts."""
        elsewhere = self.norm_scope.counted_elsewhere
        if not elsewhere:
            return None
        ranges = []
        for g, (layout, params) in enumerate(zip(self.layouts, self.group_params)):
            start, end = layout.partition(self.dp.rank)
            cursor = start
            for slot, p in zip(layout.slots, params):
                lo, hi = max(start, slot.offset), min(end, slot.end)
                if p in elsewhere and lo < hi:
                    if cursor < lo:
                        ranges.append((g, cursor - start, lo - start))
                    cursor = hi
            if cursor < end:
                ranges.append((g, cursor - start, end - start))
        return ranges

    def _norm_grads(self) -> list[torch.Tensor] | None:
        """Views of the gradient partitions over `_norm_ranges` (None: all of them)."""
        if self.norm_ranges is None:
            return None
        return [self.grads.partitions[g][lo:hi] for g, lo, hi in self.norm_ranges]

    def step(self, max_norm: float) -> StepResult:
        dp_group = self.dp.group if self.dp.size > 1 else None
        model_group = self.norm_scope.group
        if self.offload is not None:
            norm_grads = self._norm_grads()
            result, factor = unscale_and_clip_factor(self.grads.partitions if norm_grads is None else norm_grads,
                                                     self.loss_scaler, dp_group, self.check_overflow, max_norm, model_group)
            if result.applied:
                self.offload.step(factor)
                self._all_gather()
            return result
        result = step_partitions(self.optimizer, self.masters, self.grads.partitions, self.loss_scaler, dp_group,
                                 self.check_overflow, max_norm, self._norm_grads(), model_group)
        if not result.applied:
            return result
        for master, flat, layout in zip(self.masters, self.flat_params, self.layouts):
            start, end = layout.partition(self.dp.rank)
            if flat.dtype != torch.float32:
                flat[start:end].copy_(master.detach())
        self._all_gather()
        return result

    def _all_gather(self) -> None:
        """Every rank's updated partition into every rank's flat buffer."""
        for flat, layout in zip(self.flat_params, self.layouts):
            all_gather_partitions(flat, layout.partition_size, self.dp, self.allgather_elements)

    def zero_grad(self) -> None:
        self.grads.zero()

    def close(self) -> None:
        self.grads.remove()
        if self.offload is not None:
            self.offload.close()

    def memory_breakdown(self) -> dict[str, int]:
        frozen = [p for p in self.module_params if not p.requires_grad]
        parts = {"parameters": tensor_bytes(self.flat_params) + tensor_bytes(frozen), **self.grads.buffer_bytes()}
        if self.offload is not None:
            return {**parts, "master_weights": 0, "optimizer_states": 0, **self.offload.memory_breakdown()}
        owns_copy = [m for m, f in zip(self.masters, self.flat_params) if f.dtype != torch.float32]
        return {**parts, "master_weights": tensor_bytes(owns_copy),
                "optimizer_states": tensor_bytes(list(self.optimizer.state.values()))}

    def _master_and_state(self, g: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.offload is not None:
            return self.offload.group_master_and_state(g)
        return self.masters[g].detach(), self.optimizer.state.get(self.masters[g], {})

    # ---- checkpoints ---------------------------------------------------------------------------
    replicated = False  # each rank saves its own partitions

    def state_dict(self) -> dict[str, Any]:
        groups = []
        for g, layout in enumerate(self.layouts):
            master, state = self._master_and_state(g)
            groups.append({
                "slots": [(s.name, s.offset, s.numel, s.shape) for s in layout.slots],
                "partition": layout.partition(self.dp.rank),
                "padded_numel": layout.padded_numel,
                "master": master.detach().clone(),
                "state": snapshot_state(state),
            })
        return {**shard_header(self.optimizer, self.loss_scaler, "partitioned"), "groups": groups}

    def sync_masters_from_model(self) -> None:
        if self.offload is not None:
            self.offload.reload_from_params()
            return
        with torch.no_grad():
            for master, flat, layout in zip(self.masters, self.flat_params, self.layouts):
                if flat.dtype != torch.float32:
                    start, end = layout.partition(self.dp.rank)
                    master.copy_(flat[start:end].float())

    def load_universal(self, universal: dict[str, Any]) -> None:
        """Take fp32 weights and optimizer states per parameter name (any saved layout) and keep our partitions."""
        params = universal["params"]
        for g, (layout, master, flat) in enumerate(zip(self.layouts, self.masters, self.flat_params)):
            start, end = layout.partition(self.dp.rank)
            full = torch.zeros(layout.padded_numel, dtype=torch.float32)
            for slot in layout.slots:
                full[slot.offset:slot.end] = params[slot.name]["fp32"].reshape(-1)
            with torch.no_grad():
                flat.copy_(full.to(flat.dtype))
                if master is not None and flat.dtype != torch.float32:
                    master.copy_(full[start:end])
            state: dict[str, Any] = {}
            first = params[layout.slots[0].name]["state"]
            for key, value in first.items():
                if torch.is_tensor(value) and value.numel() == layout.slots[0].numel and value.dim() > 0:
                    buf = torch.zeros(layout.padded_numel, dtype=value.dtype)
                    for slot in layout.slots:
                        buf[slot.offset:slot.end] = params[slot.name]["state"][key].reshape(-1)
                    state[key] = buf[start:end].clone()
                else:
                    state[key] = value.clone() if torch.is_tensor(value) else value
            if self.offload is not None:
                self.offload.load_group(g, full[start:end], state)
            elif state:
                self.optimizer.state[master] = {k: v.to(master.device) if torch.is_tensor(v) and v.dim() > 0 else v
                                                for k, v in state.items()}
        restore_hyperparams(self.optimizer, universal.get("hyperparams"))
        if universal.get("loss_scaler"):
            self.loss_scaler.load_state_dict(universal["loss_scaler"])

