"""ZeRO stages 1 and 2: optimizer states (and, at stage 2, gradients) partitioned across ranks.

Before: every rank holds the whole model. After `PartitionedOptimizer(...)`:
- each parameter group's trainable parameters are views into one flat buffer (model dtype);
- rank i owns elements [i*S, (i+1)*S) of it: the optimizer steps only that partition, on fp32
  master weights (a copy for bf16/fp16; the flat buffer itself for fp32), so optimizer states are
  1/N of the model's;
- gradients are reduced to their owners (stage 1: from a full gradient buffer at the boundary;
  stage 2: every micro step, keeping only the owned partition), see `reducer`;
- after the step, updated partitions are all-gathered back into the flat buffers, in chunks of
  `allgather_bucket_size` elements per rank.
The torch optimizer is the user's (or the config's), untouched except that each param group now
holds one flat master partition: any `torch.optim.Optimizer` is partitioned the same way.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..comm.collectives import CommPolicy, all_gather_partitions
from ..comm.topology import AxisGroup
from ..config.sections import ZeroConfig
from ..offload.optimizer_offload import OffloadedOptimizer, Segment
from ..optim.precision import Precision
from .base import NormPiece, NormScope, ParamGroupComm, StepResult, scaled_backward, step_partitions, tensor_bytes, unscale_and_clip_factor
from .layout import GroupLayout, bucket_ranges, build_layout
from .module_only import drop_frozen
from .param_names import checkpoint_names
from .reducer import Bucket, GradientReducer, Member, ReduceOptions, spans_in
from .universal import restore_hyperparams, shard_header, snapshot_state


class PartitionedOptimizer:
    """The stage-1/2 `ZeroStrategy`."""

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        zero: ZeroConfig,
        precision: Precision,
        comm: ParamGroupComm,
        reduce: ReduceOptions = ReduceOptions(),
        offload: Callable[[list[list[Segment]]], OffloadedOptimizer] | None = None,
        norm_scope: NormScope = NormScope(),
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.norm_scope = norm_scope
        self.offloading = offload is not None
        self.comm = comm
        self.axes = comm.axes(len(optimizer.param_groups))
        self.loss_scaler = precision.loss_scaler
        self.check_overflow = precision.check_overflow
        self.allgather_elements = max(1, zero.allgather_bucket_size)
        self.policy = CommPolicy.for_group(comm.data.group)
        names = checkpoint_names(module)
        self.module_params = list(module.parameters())
        self.layouts: list[GroupLayout] = []
        self.group_params: list[list[torch.nn.Parameter]] = []
        self.flat_params: list[torch.Tensor] = []
        self.masters: list[torch.nn.Parameter | None] = []
        self.frozen_in_groups: list[list[torch.nn.Parameter]] = []
        for group, axis in zip(optimizer.param_groups, self.axes):
            self._partition_group(group, names, axis)
        partition_grads = zero.stage == 2
        self.flat_grads = [] if partition_grads else [torch.zeros_like(flat) for flat in self.flat_params]
        if partition_grads:
            self.grad_partitions = [torch.zeros(l.partition_size, dtype=f.dtype, device=f.device)
                                    for l, f in zip(self.layouts, self.flat_params)]
        else:
            self.grad_partitions = [flat[slice(*l.partition(a.rank))] for flat, l, a in zip(self.flat_grads, self.layouts, self.axes)]
        self.reducer = GradientReducer(self._buckets(zero.reduce_bucket_size), reduce, overlap=zero.overlap_comm_resolved,
                                       max_in_flight=1, policy=self._reduce_policy(zero))
        self.norm_ranges = self._norm_ranges()
        # With offload, fp32 masters and optimizer states live in host memory (or on NVMe) instead.
        self.offload = offload([[Segment(grad, flat[s:e])] for grad, flat, (s, e) in zip(
            self.grad_partitions, self.flat_params, (l.partition(a.rank) for l, a in zip(self.layouts, self.axes)))]) if offload else None

    def _reduce_policy(self, zero: ZeroConfig) -> CommPolicy:
        # `reduce_scatter: false` always all-reduces, as in DeepSpeed.
        return self.policy if zero.reduce_scatter else CommPolicy(self.policy.gather_by_all_reduce, True)

    def _buckets(self, cap: int) -> list[Bucket]:
        """Contiguous ranges of each group's flat gradient (front to back: the order backward fills them),
        each rank keeping the part inside its partition. Stage 1 reduces the kept full gradient in place;
        stage 2 stages each micro step's gradients and adds the reduced part into its partition."""
        buckets = []
        for g, (layout, params, axis) in enumerate(zip(self.layouts, self.group_params, self.axes)):
            own_start, _ = layout.partition(axis.rank)
            for start, end in bucket_ranges(layout, cap):
                members = [Member(p, slot.offset - start) for slot, p in zip(layout.slots, params) if start <= slot.offset < end]
                if not members:
                    continue  # a group without trainable parameters: nothing is ever reduced into it
                spans = spans_in(start, end, layout.partition_size, axis.size)
                lo, hi = spans[axis.rank]
                dest = self.grad_partitions[g][start + lo - own_start:start + hi - own_start] if hi > lo else \
                    self.grad_partitions[g][:0]
                covered = members[-1].offset + members[-1].param.numel() if members else 0
                buffer = self.flat_grads[g][start:end] if self.flat_grads else None
                padding = [(covered, end - start)] if buffer is None and covered < end - start else []
                buckets.append(Bucket(axis, members, end - start, spans, dest=dest, buffer=buffer, padding=padding,
                                      average_over=self.comm.average_over(g)))
        return buckets

    def _partition_group(self, group: dict[str, Any], names: dict[torch.nn.Parameter, str], axis: AxisGroup) -> None:
        trainable = [p for p in group["params"] if p.requires_grad]
        for p in trainable:
            if p not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model; ZeRO can only partition the model's parameters")
        # Flat order is reverse registration order; slots record it (see layout.build_layout).
        layout = build_layout([(names[p], p) for p in trainable], axis.size)
        ordered = list(reversed(trainable))
        # A group may hold no trainable parameter (the Hugging Face Trainer's no-decay group under LoRA, whose
        # norms and biases are frozen): it keeps its place in param_groups, as schedulers index them, with a
        # padding-only partition that its optimizer steps as zeros.
        like = trainable[0] if trainable else next(iter(self.module_params), torch.zeros(()))
        flat = torch.zeros(layout.padded_numel, dtype=like.dtype if like.is_floating_point() else torch.float32,
                           device=like.device)
        for slot, p in zip(layout.slots, ordered):
            if p.dtype != flat.dtype:
                raise ValueError(f"parameter `{slot.name}` is {p.dtype} but its group holds {flat.dtype}; ZeRO needs one dtype per group")
            flat[slot.offset:slot.end].copy_(p.data.reshape(-1))
            p.data = flat[slot.offset:slot.end].view_as(p)
        start, end = layout.partition(axis.rank)
        own = flat[start:end]
        master = None if self.offloading else torch.nn.Parameter(own if own.dtype == torch.float32 else own.float().clone())
        self.layouts.append(layout)
        self.group_params.append(ordered)
        self.flat_params.append(flat)
        self.masters.append(master)
        self.frozen_in_groups.append([p for p in group["params"] if not p.requires_grad])
        group["params"] = [master] if master is not None else []

    # ---- ZeroStrategy ------------------------------------------------------------------------
    partitions_parameters = False

    def prepare_backward(self, boundary: bool) -> None:
        self.reducer.prepare(boundary)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        scaled_backward(loss, self.loss_scaler.loss_scale, retain_graph)

    def _norm_ranges(self) -> list[list[tuple[int, int]]] | None:
        """Per group, the [lo, hi) ranges of this rank's gradient partition the norm covers: all but the
        slots of parameters another rank counts (NormScope); None when that is everything."""
        elsewhere = self.norm_scope.counted_elsewhere
        if not elsewhere:
            return None
        per_group = []
        for layout, params, axis in zip(self.layouts, self.group_params, self.axes):
            start, end = layout.partition(axis.rank)
            ranges, cursor = [], start
            for slot, p in zip(layout.slots, params):
                lo, hi = max(start, slot.offset), min(end, slot.end)
                if p in elsewhere and lo < hi:
                    if cursor < lo:
                        ranges.append((cursor - start, lo - start))
                    cursor = hi
            if cursor < end:
                ranges.append((cursor - start, end - start))
            per_group.append(ranges)
        return per_group

    def _norm_pieces(self) -> list[NormPiece]:
        """Each group's gradient partition (less what another rank counts), summed over its own group."""
        pieces = []
        for g, (grads, axis) in enumerate(zip(self.grad_partitions, self.axes)):
            counted = [grads] if self.norm_ranges is None else [grads[lo:hi] for lo, hi in self.norm_ranges[g]]
            pieces.append(NormPiece(counted, axis, self.comm.extra(g)))
        return pieces

    def step(self, max_norm: float) -> StepResult:
        model_group = self.norm_scope.group
        if self.offload is not None:
            result, factor = unscale_and_clip_factor(self._norm_pieces(), self.loss_scaler, self.check_overflow,
                                                     max_norm, model_group)
            if result.applied:
                self.offload.step(factor)
                self._all_gather()
            return result
        masters = [m for m in self.masters if m is not None]
        result = step_partitions(self.optimizer, masters, self.grad_partitions, self._norm_pieces(), self.loss_scaler,
                                 self.check_overflow, max_norm, model_group)
        if not result.applied:
            return result
        for master, flat, layout, axis in zip(masters, self.flat_params, self.layouts, self.axes):
            start, end = layout.partition(axis.rank)
            if flat.dtype != torch.float32:
                flat[start:end].copy_(master.detach())
        self._all_gather()
        return result

    def _all_gather(self) -> None:
        """Every rank's updated partition into every rank's flat buffer."""
        for flat, layout, axis in zip(self.flat_params, self.layouts, self.axes):
            all_gather_partitions(flat, layout.partition_size, axis, self.allgather_elements, self.policy)

    def zero_grad(self) -> None:
        for part in self.grad_partitions:
            part.zero_()
        self.reducer.zero()

    def module_state_dict(self, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
        return drop_frozen(self.module, self.module.state_dict(), exclude_frozen)

    def load_module_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        self.module.load_state_dict(state, strict=strict)

    def close(self) -> None:
        self.reducer.remove()
        if self.offload is not None:
            self.offload.close()

    def memory_breakdown(self) -> dict[str, int]:
        frozen = [p for p in self.module_params if not p.requires_grad]
        parts = {"parameters": tensor_bytes(self.flat_params) + tensor_bytes(frozen),
                 "gradients": tensor_bytes(self.flat_grads or self.grad_partitions),
                 "gradient_buckets": self.reducer.staging_bytes()}
        if self.offload is not None:
            return {**parts, "master_weights": 0, "optimizer_states": 0, **self.offload.memory_breakdown()}
        owns_copy = [m for m, f in zip(self.masters, self.flat_params) if f.dtype != torch.float32]
        return {**parts, "master_weights": tensor_bytes(owns_copy),
                "optimizer_states": tensor_bytes(list(self.optimizer.state.values()))}

    def _master_and_state(self, g: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.offload is not None:
            return self.offload.group_master_and_state(g)
        master = self.masters[g]
        assert master is not None
        return master.detach(), self.optimizer.state.get(master, {})

    # ---- checkpoints ---------------------------------------------------------------------------
    replicated = False  # each rank saves its own partitions

    def state_dict(self) -> dict[str, Any]:
        groups = []
        for g, layout in enumerate(self.layouts):
            master, state = self._master_and_state(g)
            groups.append({
                "slots": [(s.name, s.offset, s.numel, s.shape) for s in layout.slots],
                "partition": layout.partition(self.axes[g].rank),
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
            for master, flat, layout, axis in zip(self.masters, self.flat_params, self.layouts, self.axes):
                if master is not None and flat.dtype != torch.float32:
                    start, end = layout.partition(axis.rank)
                    master.copy_(flat[start:end].float())

    def load_universal(self, universal: dict[str, Any]) -> None:
        """Take fp32 weights and optimizer states per parameter name (any saved layout) and keep our partitions."""
        params = universal["params"]
        for g, (layout, master, flat) in enumerate(zip(self.layouts, self.masters, self.flat_params)):
            start, end = layout.partition(self.axes[g].rank)
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
                assert master is not None  # without offload every group has its fp32 master
                self.optimizer.state[master] = {k: v.to(master.device) if torch.is_tensor(v) and v.dim() > 0 else v
                                                for k, v in state.items()}
        restore_hyperparams(self.optimizer, universal.get("hyperparams"))
        if universal.get("loss_scaler"):
            self.loss_scaler.load_state_dict(universal["loss_scaler"])

