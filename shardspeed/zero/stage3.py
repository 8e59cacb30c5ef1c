"""ZeRO stage 3: parameters, gradients and optimizer states all partitioned across ranks.

Three parts, composed here:
- the parameter manager (`param_manager`) partitions the parameters and gathers them around each
  module's use; it works on its own (no optimizer) for inference;
- the gradient reducer (`reducer`) takes each gradient as it is produced, copies it into a bucket
  laid out rank by rank, and reduce-scatters full buckets into the owners' gradient partitions
  (the bucket being filled and the one being reduced hold at most `reduce_bucket_size`,
  `stage3_prefetch_bucket_size` and `stage3_max_live_parameters` whole elements together, or two
  units where a unit is bigger); it tells the manager when a unit's gradients are all in;
- the optimizer step (this class) steps each param group's flat partition (an fp32 master copy for
  16-bit training, host or NVMe copies with offload), exactly as at stages 1-2, so any elementwise
  torch optimizer works unchanged; units kept gathered across the step take the new values.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..config.sections import AioConfig, ZeroConfig
from ..offload.optimizer_offload import OffloadedOptimizer, Segment
from ..optim.precision import Precision
from .base import NormPiece, ParamGroupComm, StepResult, scaled_backward, step_partitions, tensor_bytes, unscale_and_clip_factor
from .gather import BATCH_ELEMENTS
from .param_manager import ParameterManager
from .param_shards import ParameterNotGatheredError, Unit, shard_of
from .reducer import Bucket, GradientReducer, Member, ReduceOptions
from .stage3_state import load_universal_units, unit_states
from .unit_plan import FROZEN

Offload = Callable[[list[list[Segment]]], OffloadedOptimizer]


class Stage3Optimizer:
    """The stage-3 `ZeroStrategy`."""

    replicated = False
    partitions_parameters = True

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None, zero: ZeroConfig,
                 precision: Precision, comm: ParamGroupComm, reduce: ReduceOptions = ReduceOptions(),
                 offload: Offload | None = None, aio: AioConfig | None = None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.comm = comm
        self.loss_scaler = precision.loss_scaler
        self.check_overflow = precision.check_overflow
        self.gather_16bit_on_save = zero.gather_16bit_weights_on_model_save
        groups = optimizer.param_groups if optimizer is not None else []
        self.manager = ParameterManager(module, zero, comm.data, group_of=_group_of(module, optimizer),
                                        axis_of=lambda key: comm.data if key == FROZEN else comm.axis(int(key)), aio=aio)
        self.manager.on_shards_rewritten = self.refresh_masters
        self.trainable = self.manager.trainable
        self.runs = _runs(self.trainable)  # units whose shards (and gradients) lie end to end
        self.grad_flats = [torch.zeros(sum(u.partition_size for u in run), dtype=run[0].dtype, device=run[0].device)
                           for run in self.runs]
        for flat, run in zip(self.grad_flats, self.runs):
            at = 0
            for unit in run:
                unit.grad_partition = flat[at:at + unit.partition_size]
                at += unit.partition_size
        # Reductions mirror the gathers: a bucket holds whole gradients of consecutive units, at most
        # what a prefetch batch gathers, and never more than the live cap lets be gathered at once.
        cap = min(zero.reduce_bucket_size, zero.prefetch_bucket_size, zero.max_live_parameters)
        self.reducer = GradientReducer(self._buckets(cap), reduce, overlap=zero.overlap_comm_resolved,
                                       max_in_flight=1, listener=self.manager.grad_consumed, keep_staging=False)
        # Per optimizer group, its runs: one master (and gradient) per run; with offload, segments instead.
        self.group_runs = [[i for i, run in enumerate(self.runs) if run[0].group_key == g] for g in range(len(groups))]
        self.masters: list[torch.nn.Parameter | None] = [None] * len(self.runs)
        self.offload = offload(self._segments()) if offload is not None else None
        if self.offload is None:
            for i, run in enumerate(self.runs):
                part = self._param_flat(i)
                self.masters[i] = torch.nn.Parameter(part if part.dtype == torch.float32 else part.float())
            for g, group in enumerate(groups):
                group["params"] = [self.masters[i] for i in self.group_runs[g]]

    # ---- set-up ------------------------------------------------------------------------------
    def _master(self, i: int) -> torch.nn.Parameter:
        """Run i's fp32 master, stepped by the optimizer (every run has one unless the optimizer is offloaded)."""
        master = self.masters[i]
        assert master is not None, "with offload_optimizer the offloaded optimizer holds the masters"
        return master

    def _param_flat(self, i: int) -> torch.Tensor:
        """Run i's parameter shards, end to end (a view of the manager's flat buffer)."""
        run = self.runs[i]
        first = run[0]
        assert first.partition is not None, "NVMe-swapped shards are only stepped with offload_optimizer"
        flat = self.manager.flat[first.home]
        start = first.partition.storage_offset() - flat.storage_offset()
        return flat[start:start + sum(u.partition_size for u in run)]

    def _buckets(self, cap: int) -> list[Bucket]:
        """Consecutive units of one run, back to front (backward's order): one rank-major buffer per
        bucket, reduce-scattered into one slice of the run's gradient partitions.

        Units join a bucket until it holds about BATCH_ELEMENTS whole elements (as gathers batch
        them), and never more than cap / 2, so the one being filled and the one being reduced stay
        within `cap` together; a bigger unit is a bucket of its own. The persistent unit is always
        alone: its parameters (every layer's small ones) get gradients all through backward, so its
        bucket is filled from the first layer's backward to the last.
        """
        limit = min(cap // 2, BATCH_ELEMENTS)
        buckets = []
        for run, grads in zip(self.runs, self.grad_flats):
            offsets, at = [], 0
            for unit in run:
                offsets.append(at)
                at += unit.partition_size
            end = len(run)
            while end > 0:
                start, full = end - 1, run[end - 1].full_numel
                while (start > 0 and not run[end - 1].persistent and not run[start - 1].persistent
                       and full < limit and full + run[start - 1].full_numel <= cap // 2):
                    start -= 1
                    full += run[start].full_numel
                buckets.append(self._bucket(run[start:end], grads[offsets[start]:offsets[end - 1] + run[end - 1].partition_size],
                                            self.comm.data.size))
                end = start
        return buckets

    @staticmethod
    def _bucket(units: list[Unit], dest: torch.Tensor, average_over: int) -> Bucket:
        axis = units[0].dp
        chunk = dest.numel()
        members, column = [], 0
        for unit in units:
            members += [Member(p, column + slot.offset, slot.shard) for p, slot in zip(unit.params, unit.slots)]
            column += unit.partition_size
        spans = [(r * chunk, (r + 1) * chunk) for r in range(axis.size)]
        return Bucket(axis, members, chunk * axis.size, spans, dest=dest, average_over=average_over)

    def _segments(self) -> list[list[Segment]]:
        """Per optimizer group, what offload steps: each resident run whole, each NVMe-swapped unit alone."""
        out: list[list[Segment]] = []
        self.segment_units: list[list[tuple[Segment, list[Unit]]]] = []
        for runs in self.group_runs:
            pieces: list[tuple[Segment, list[Unit]]] = []
            for i in runs:
                run = self.runs[i]
                if run[0].swapper is None:
                    pieces.append((Segment(self.grad_flats[i], self._param_flat(i)), run))
                else:
                    for u in run:
                        assert u.grad_partition is not None  # given to every trainable unit in __init__
                        pieces.append((Segment(u.grad_partition, None, load=u.load_partition, store=u.save_partition), [u]))
            self.segment_units.append(pieces)
            out.append([seg for seg, _ in pieces])
        return out

    # ---- ZeroStrategy ---------------------------------------------------------------------------
    def prepare_backward(self, boundary: bool) -> None:
        self.reducer.prepare(boundary)  # stage 3 reduces every micro step, as stage 2 does

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        scaled_backward(loss, self.loss_scaler.loss_scale, retain_graph)

    def _norm_pieces(self) -> list[NormPiece]:
        assert self.optimizer is not None
        return [NormPiece([self.grad_flats[i] for i in runs], self.comm.axis(g), self.comm.extra(g))
                for g, runs in enumerate(self.group_runs)]

    def step(self, max_norm: float) -> StepResult:
        if self.offload is not None:
            result, factor = unscale_and_clip_factor(self._norm_pieces(), self.loss_scaler, self.check_overflow, max_norm)
            if result.applied:
                self.offload.step(factor)
                if self.manager.param_swapper is not None:
                    self.manager.param_swapper.flush()
                self.manager.refresh_gathered()
            return result
        assert self.optimizer is not None
        order = [i for runs in self.group_runs for i in runs]
        masters = [self._master(i) for i in order]
        result = step_partitions(self.optimizer, masters, [self.grad_flats[i] for i in order], self._norm_pieces(),
                                 self.loss_scaler, self.check_overflow, max_norm)
        if not result.applied:
            return result
        with torch.no_grad():
            for i, master in zip(order, masters):
                part = self._param_flat(i)
                if part.dtype != torch.float32:
                    part.copy_(master)
        self.manager.refresh_gathered()
        return result

    def zero_grad(self) -> None:
        for flat in self.grad_flats:
            flat.zero_()

    def close(self) -> None:
        self.reducer.remove()
        self.manager.close()
        if self.offload is not None:
            self.offload.close()

    def memory_breakdown(self) -> dict[str, int]:
        parts = {**self.manager.memory_breakdown(), "gradients": tensor_bytes(self.grad_flats),
                 "gradient_buckets_peak": self.reducer.staging_peak_bytes}
        if self.offload is not None:
            return {**parts, "master_weights": 0, "optimizer_states": 0, **self.offload.memory_breakdown()}
        return {
            **parts,
            "master_weights": tensor_bytes([m for m, run in zip(self.masters, self.runs)
                                            if m is not None and run[0].dtype != torch.float32]),
            "optimizer_states": tensor_bytes(list(self.optimizer.state.values())) if self.optimizer is not None else 0,
        }

    # ---- whole weights ---------------------------------------------------------------------------
    def refresh_masters(self, unit: Unit) -> None:
        """The unit's shards were rewritten (a load, GatheredParameters with a modifier): masters follow."""
        if unit.group_key == FROZEN or self.optimizer is None:
            return
        if self.offload is not None:
            self.offload.reload_from_params([seg for pieces in self.segment_units for seg, units in pieces if unit in units])
            return
        i = next(i for i, run in enumerate(self.runs) if unit in run)
        part, master = self._param_flat(i), self.masters[i]
        if master is not None and part.dtype != torch.float32:
            with torch.no_grad():
                master.copy_(part)

    def module_state_dict(self, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
        """Whole weights on data-parallel rank 0 ({} elsewhere); every rank must call it."""
        return self.consolidated_state_dict(exclude_frozen)

    def consolidated_state_dict(self, exclude_frozen: bool = False, on_all_ranks: bool = False) -> dict[str, torch.Tensor]:
        """The module's full state dict, gathered unit by unit; every rank must call it.

        Only rank 0 of the data-parallel group receives it unless `on_all_ranks`.
        """
        # Experts split over expert-parallel ranks: the first rank of each expert-data group keeps its experts
        # (the checkpoint collects them from there).
        lead_experts = any(g is not None and g.rank == 0 for g in self.comm.per_group)
        return self.manager.consolidated_state_dict(on_all_ranks or self.comm.data.rank == 0 or lead_experts, exclude_frozen)

    def load_module_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        self.manager.load_module_state_dict(state, strict)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        from .universal import shard_header

        assert self.optimizer is not None
        return {**shard_header(self.optimizer, self.loss_scaler, "param_shards"),
                "rank": self.comm.data.rank, "world": self.comm.data.size, "units": unit_states(self)}

    def sync_masters_from_model(self) -> None:
        if self.optimizer is None:
            return
        if self.offload is not None:
            self.offload.reload_from_params()
            return
        for run in self.runs:
            self.refresh_masters(run[0])

    def load_universal(self, universal: dict[str, Any]) -> None:
        load_universal_units(self, universal)
        self.manager.refresh_gathered()


def _group_of(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[torch.nn.Parameter, int]:
    """Each trainable parameter's optimizer group; checks that the optimizer and the model agree."""
    if optimizer is None:
        return {}  # inference: every parameter is partitioned as frozen
    group_of = {p: g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
    names = {p: n for n, p in module.named_parameters()}
    for p in group_of:
        if p not in names:
            raise ValueError("the optimizer holds a parameter that is not in the model; ZeRO-3 can only partition the model's parameters")
    for p, name in names.items():
        if p.requires_grad and p not in group_of:
            raise ValueError(f"parameter `{name}` requires grad but is in no optimizer param group; ZeRO-3 partitions every "
                             "parameter, so freeze it (requires_grad_(False)) or give it to the optimizer")
    return group_of


def _runs(trainable: list[Unit]) -> list[list[Unit]]:
    """Trainable units grouped by where their shards live (resident: the manager's flat buffers, in
    order; NVMe-swapped: one run per key), each group's units in unit order."""
    runs: dict[Hashable, list[Unit]] = {}
    for unit in trainable:
        key = unit.home if unit.swapper is None else ("swapped", unit.group_key, unit.device, unit.dtype)
        runs.setdefault(key, []).append(unit)
    return list(runs.values())


__all__ = ["ParameterNotGatheredError", "Stage3Optimizer", "shard_of"]
