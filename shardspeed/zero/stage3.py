"""ZeRO stage 3: parameters, gradients and optimizer states all partitioned across ranks.

Each rank keeps 1/N of every parameter (`param_shards`). Forward hooks gather the units a module
needs just before it runs and release them after, unless the recorded schedule says they are
used again soon (`stage3_max_reuse_distance`) and the live cap allows it. Outputs are wrapped so
that, in backward, the module's units are gathered again before its gradients are computed.
When every gradient of a unit has arrived it is reduce-scattered (gloo: all-reduced) into the
owners' gradient partitions, and the unit is released. While a module runs, the next units in
the schedule are gathered asynchronously, up to `stage3_prefetch_bucket_size` elements, never
exceeding `stage3_max_live_parameters` gathered elements (a module's own units always are).
Parameters smaller than `stage3_param_persistence_threshold` stay gathered (persistent units).

The optimizer steps each unit's flat partition (fp32 master copy for 16-bit training), exactly
as at stages 1-2, so any elementwise torch optimizer works unchanged.
"""
from __future__ import annotations

import types
from collections import deque
from typing import Any, Callable

import torch
import torch.distributed as dist

from ..comm.topology import AxisGroup
from ..runtime.loss_scaler import LossScaler
from ..config.sections import AioConfig, OffloadParamConfig
from ..offload.optimizer_offload import OffloadedOptimizer, Segment
from ..offload.param_swap import ParamSwapper
from .base import StepResult, scaled_backward, step_partitions, tensor_bytes, unscale_and_clip_factor
from .fetch_schedule import FetchSchedule
from .param_shards import ParameterNotGatheredError, Unit, is_partitioned, needs_collective, not_gathered_error, shard_of
from .universal import restore_hyperparams, shard_header, snapshot_state

FROZEN = "frozen"  # unit group key of parameters that never get gradients


class _PreBackward(torch.autograd.Function):
    """Identity on a module's outputs whose backward gathers the module's units first."""

    @staticmethod
    def forward(ctx: Any, strategy: "Stage3Optimizer", module: torch.nn.Module, *tensors: torch.Tensor) -> Any:
        ctx.strategy, ctx.module = strategy, module
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.strategy._pre_backward(ctx.module)
        return (None, None, *grads)


class _LinearSavingParameter(torch.autograd.Function):
    """F.linear that saves the weight Parameter for backward rather than the `weight.t()` view F.linear saves.

    The view would pin the gathered buffer from forward until backward, so every linear layer's
    weights would stay resident in between. The Parameter itself is re-gathered before its module's
    backward (`_PreBackward`), so saving it costs nothing (DeepSpeed's `memory_efficient_linear`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = rows.t().matmul(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _LinearSavingParameter.apply(x, module.weight, module.bias)


class Stage3Optimizer:
    """The stage-3 `ZeroStrategy`; also the manager that parameter units ask when touched."""

    replicated = False
    partitions_parameters = True
    MAX_REDUCE_IN_FLIGHT = 2

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        dp: AxisGroup,
        loss_scaler: LossScaler,
        *,
        prefetch_bucket_size: int,
        param_persistence_threshold: int,
        model_persistence_threshold: int,
        max_live_parameters: int,
        max_reuse_distance: int,
        check_overflow: bool,
        leaf_modules: dict[str, Any] | None = None,
        module_granularity_threshold: int = 0,
        comm_dtype: torch.dtype | None = None,
        predivide: float | None = None,
        offload: Callable[[list[list[Segment]]], OffloadedOptimizer] | None = None,
        offload_param: OffloadParamConfig | None = None,
        aio: AioConfig | None = None,
        memory_efficient_linear: bool = True,
    ) -> None:
        self.module = module
        self.memory_efficient_linear = memory_efficient_linear
        self.offload_param = offload_param if offload_param is not None and offload_param.device != "none" else None
        self.aio = aio
        self.param_swapper: ParamSwapper | None = None
        self.optimizer = optimizer
        self.dp = dp
        self.loss_scaler = loss_scaler
        self.check_overflow = check_overflow
        self.prefetch_elements = prefetch_bucket_size
        self.max_live = max_live_parameters
        self.max_reuse = max_reuse_distance
        self.comm_dtype = comm_dtype
        self.predivide = float(dp.size if predivide is None else predivide)
        self.schedule = FetchSchedule()
        self._live: dict[Unit, None] = {}  # gathered (or being gathered) non-persistent units, in order
        self._live_elements = 0
        self._live_bytes = 0
        self.live_peak_bytes = 0
        self.reduce_peak_bytes = 0
        self._stack: list[torch.nn.Module] = []
        self._in_backward = False
        self._in_forward_pass = False
        self._reduces: deque[tuple[Unit, torch.Tensor, torch.Tensor, Any]] = deque()
        self._leaves = _leaf_modules(module, leaf_modules or {}, module_granularity_threshold)
        self._build_units(param_persistence_threshold, model_persistence_threshold)
        self._build_optimizer_groups(offload)
        self._handles = self._install_hooks()

    # ---- set-up ------------------------------------------------------------------------------
    def _build_units(self, persistence_threshold: int, model_persistence_threshold: int) -> None:
        group_of: dict[torch.nn.Parameter, int] = {}
        for g, group in enumerate(self.optimizer.param_groups if self.optimizer is not None else ()):
            for p in group["params"]:
                group_of[p] = g
        names = {p: n for n, p in self.module.named_parameters()}
        for p in group_of:
            if p not in names:
                raise ValueError("the optimizer holds a parameter that is not in the model; ZeRO-3 can only partition the model's parameters")
        for p, name in names.items():
            # Without an optimizer (inference) every parameter is partitioned as frozen.
            if p.requires_grad and p not in group_of and self.optimizer is not None:
                raise ValueError(f"parameter `{name}` requires grad but is in no optimizer param group; ZeRO-3 partitions every "
                                 "parameter, so freeze it (requires_grad_(False)) or give it to the optimizer")

        def key(p: torch.nn.Parameter) -> Any:
            return group_of[p] if p in group_of and p.requires_grad else FROZEN

        persistent_budget = model_persistence_threshold
        assigned: dict[torch.nn.Parameter, Unit] = {}
        self.units: list[Unit] = []
        persistent: dict[Any, list[torch.nn.Parameter]] = {}
        # Units follow module registration order; a parameter belongs to the first module holding it.
        per_module: list[tuple[torch.nn.Module, dict[Any, list[torch.nn.Parameter]]]] = []
        seen: set[torch.nn.Parameter] = set()
        inside_leaf = {d for leaf in self._leaves for d in leaf.modules() if d is not leaf}
        for mod in self.module.modules():
            if mod in inside_leaf:
                continue  # fetched with its leaf ancestor
            buckets: dict[Any, list[torch.nn.Parameter]] = {}
            own = mod.parameters() if mod in self._leaves else mod._parameters.values()
            for p in own:
                if p is None or p in seen:
                    continue
                seen.add(p)
                numel = p.ds_numel if is_partitioned(p) else p.numel()
                if numel < persistence_threshold and numel <= persistent_budget:
                    persistent_budget -= numel
                    persistent.setdefault(key(p), []).append(p)
                else:
                    buckets.setdefault(key(p), []).append(p)
            per_module.append((mod, buckets))
        for group_key, params in persistent.items():
            self.units.append(self._make_unit(params, names, group_key, persistent=True))
        for _, buckets in per_module:
            for group_key, params in buckets.items():
                self.units.append(self._make_unit(params, names, group_key, persistent=False))
        for unit in self.units:
            for p in unit.params:
                assigned[p] = unit
        # What each module needs gathered while it runs: the units of its direct parameters.
        self.module_units: dict[torch.nn.Module, list[Unit]] = {}
        for mod in self.module.modules():
            needed: list[Unit] = []
            own = [] if mod in inside_leaf else mod.parameters() if mod in self._leaves else mod._parameters.values()
            for p in own:
                if p is not None and not assigned[p].persistent and assigned[p] not in needed:
                    needed.append(assigned[p])
            self.module_units[mod] = needed
        if self.offload_param is not None and self.offload_param.device == "nvme":
            self._swap_partitions()
        for unit in self.units:
            unit.adopt()
            if unit.persistent:
                unit.gather()

    def _make_unit(self, params: list[torch.nn.Parameter], names: dict, group_key: Any, persistent: bool) -> Unit:
        dtype = params[0].dtype
        for p in params:
            if p.dtype != dtype:
                raise ValueError(f"parameter `{names[p]}` is {p.dtype} but others in its group are {dtype}; ZeRO needs one dtype per group")
        device = params[0].ds_tensor.device if is_partitioned(params[0]) else params[0].device
        compute = device
        if self.offload_param is not None and not persistent:
            device = torch.device("cpu")  # offload_param: shards in host memory, gathered onto the compute device
        swapped = self.offload_param is not None and self.offload_param.device == "nvme" and not persistent
        unit = Unit(params, [names[p] for p in params], self.dp, self, dtype, device, persistent=persistent,
                    compute_device=compute, resident=not swapped)
        if unit.partition is not None and self.offload_param is not None and self.offload_param.pin_memory and compute.type == "cuda":
            unit.partition = unit.partition.pin_memory()
        unit.group_key = group_key
        unit.master = None
        unit.grad_partition = None
        unit.pending = 0
        unit.reduced = False
        return unit

    def _swap_partitions(self) -> None:
        """offload_param nvme: the non-persistent units' shards go to a swap file (persistent ones stay here)."""
        swapped = [u for u in self.units if u.partition is None]
        if not swapped:
            return
        regions = {i: (u.partition_size, u.dtype) for i, u in enumerate(swapped)}
        self.param_swapper = ParamSwapper(regions, self.offload_param, self.aio, rank=dist.get_rank() if dist.is_initialized() else 0,
                                          pin=self.offload_param.pin_memory and swapped[0].compute_device.type == "cuda")
        for i, unit in enumerate(swapped):
            unit.swapper, unit.key = self.param_swapper, i

    def _build_optimizer_groups(self, offload: Callable[[list[list[Segment]]], OffloadedOptimizer] | None) -> None:
        self.trainable = [u for u in self.units if u.group_key != FROZEN]
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        for unit in self.trainable:
            part = unit.partition
            unit.grad_partition = torch.zeros(unit.partition_size, dtype=unit.dtype, device=unit.device)
            if offload is None:
                unit.master = torch.nn.Parameter(part if part.dtype == torch.float32 else part.float())
        self.segments = {unit: Segment(unit.grad_partition, unit.partition) if unit.swapper is None else
                         Segment(unit.grad_partition, None, load=unit.load_partition, store=unit.save_partition)
                         for unit in self.trainable}
        # With offload, fp32 masters and optimizer states live in host memory (or on NVMe) instead.
        self.offload = offload([[self.segments[u] for u in self.trainable if u.group_key == g] for g in range(len(groups))]) \
            if offload is not None else None
        if self.offload is None:
            for g, group in enumerate(groups):
                group["params"] = [u.master for u in self.trainable if u.group_key == g]

    def _install_hooks(self) -> list[Any]:
        handles = []
        for mod in self.module.modules():
            handles.append(mod.register_forward_pre_hook(self._pre_forward))
            handles.append(mod.register_forward_hook(self._post_forward, always_call=True))  # pops the stack even when forward raises
        for unit in self.trainable:
            for p in unit.params:
                handles.append(p.register_post_accumulate_grad_hook(self._on_grad_ready))
        self._patched_linears = []
        if self.memory_efficient_linear:
            for mod in self.module.modules():
                if type(mod).forward is torch.nn.Linear.forward and self.module_units.get(mod):
                    mod.forward = types.MethodType(_linear_forward, mod)
                    self._patched_linears.append(mod)
        return handles

    # ---- forward --------------------------------------------------------------------------------
    def _pre_forward(self, module: torch.nn.Module, args: Any) -> None:
        if not self._stack and not self._in_backward:
            if self._in_forward_pass:
                self._end_step()  # a second forward with no backward in between starts a new step
            self._begin_forward()
        self._stack.append(module)
        units = self.module_units[module]
        if not units:
            return
        self.schedule.event("F", module, units)
        for unit in units:
            self._fetch(unit)
            unit.users += 1
        self._prefetch()

    def _post_forward(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        self._stack.pop()
        units = self.module_units[module]
        for unit in units:
            unit.users -= 1
            if unit.users == 0:
                self._after_forward_use(unit)
        if units and torch.is_grad_enabled():
            output = _wrap_outputs(output, self, module)
        if not self._stack and not self._in_backward:
            self._end_forward()
        return output

    def _begin_forward(self) -> None:
        if not self._in_forward_pass:
            self._in_forward_pass = True
            self.schedule.begin_step()

    def _end_forward(self) -> None:
        if not torch.is_grad_enabled():
            self._end_step()  # no backward will follow (evaluation)

    def _after_forward_use(self, unit: Unit) -> None:
        if unit.persistent:
            return
        if self.schedule.reuse_distance(unit) <= self.max_reuse and self._live_elements <= self.max_live:
            return  # used again soon: keep it
        self.release_unit(unit)

    # ---- backward -------------------------------------------------------------------------------
    def _begin_backward(self) -> None:
        if self._in_backward:
            return
        self._in_backward = True
        if not self._in_forward_pass:
            self._begin_forward()
        for unit in self.trainable:
            unit.pending = len(unit.params)  # trainable units hold only parameters that require grad
            unit.reduced = False
        torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)

    def _pre_backward(self, module: torch.nn.Module) -> None:
        self._begin_backward()
        units = self.module_units[module]
        self.schedule.event("B", module, units)
        for unit in units:
            self._fetch(unit)
        self._prefetch()

    def _on_grad_ready(self, param: torch.nn.Parameter) -> None:
        self._begin_backward()
        unit = param.ds_unit
        unit.pending -= 1
        if unit.pending == 0:
            self._reduce(unit)

    def _reduce(self, unit: Unit) -> None:
        """Send the unit's gradients to their owners (asynchronously) and drop the whole gradients."""
        unit.reduced = True
        world = self.dp.size
        dtype = self.comm_dtype or unit.dtype
        # Shards tile each rank's block exactly, so every element is written below: no memset.
        send = torch.empty(world * unit.partition_size, dtype=dtype, device=unit.compute_device)
        blocks = send.view(world, unit.partition_size)
        for p, slot in zip(unit.params, unit.slots):
            if p.grad is None:
                blocks[:, slot.offset:slot.offset + slot.shard].zero_()
                continue
            grad = p.grad.reshape(-1)
            padded = slot.shard * world
            if grad.numel() != padded:
                grad = torch.nn.functional.pad(grad, (0, padded - grad.numel()))
            blocks[:, slot.offset:slot.offset + slot.shard].copy_(grad.view(world, slot.shard))
            p.grad = None
        if self.predivide != 1.0:
            send.div_(self.predivide)
        if not needs_collective(self.dp):
            recv, work = send, None
        elif dist.get_backend(self.dp.group) == "gloo":
            recv, work = send, dist.all_reduce(send, group=self.dp.group, async_op=True)
        else:
            recv = torch.empty(unit.partition_size, dtype=dtype, device=send.device)
            work = dist.reduce_scatter_tensor(recv, send, group=self.dp.group, async_op=True)
        self._reduces.append((unit, send, recv, work))
        self.reduce_peak_bytes = max(self.reduce_peak_bytes, sum(s.numel() * s.element_size() for _, s, _, _ in self._reduces))
        if not unit.persistent and unit.users == 0:
            self.release_unit(unit)
        while len(self._reduces) > self.MAX_REDUCE_IN_FLIGHT:
            self._finish_reduce()

    def _finish_reduce(self) -> None:
        unit, send, recv, work = self._reduces.popleft()
        if work is not None:
            work.wait()
        mine = recv if recv.numel() == unit.partition_size else recv.view(self.dp.size, unit.partition_size)[self.dp.rank]
        post = self.dp.size / self.predivide
        if post != 1.0:
            mine = mine / post
        unit.grad_partition.add_(mine.to(device=unit.grad_partition.device, dtype=unit.grad_partition.dtype))

    def _end_backward(self) -> None:
        for unit in self.trainable:  # gradients that never came (unused parameters) reduce as zeros
            if not unit.reduced:
                self._reduce(unit)
        while self._reduces:
            self._finish_reduce()
        self._end_step()

    def _end_step(self) -> None:
        for unit in list(self._live):
            if unit.users == 0:
                self.release_unit(unit)
        self.schedule.end_step()
        self._in_backward = False
        self._in_forward_pass = False

    # ---- gathering ------------------------------------------------------------------------------
    def _fetch(self, unit: Unit) -> None:
        if unit.persistent:
            return
        if not unit.gathered:
            if unit.swapper is not None and not unit.fetching and not unit.swapper.has_free():
                self._finish_prefetched_reads()
            self._add_live(unit)
            unit.finish_gather()
            self._note_live()

    def _finish_prefetched_reads(self) -> None:
        """NVMe: every swap buffer is held by a prefetched read; complete those gathers to free the buffers."""
        for live in list(self._live):
            if live._reading is not None:
                live.finish_gather()

    def _prefetch(self) -> None:
        if self.prefetch_elements <= 0 or not self.schedule.valid:
            return
        live = self._live_elements
        for position, units in self.schedule.prefetch_window(self.prefetch_elements):
            for unit in units:
                if unit.persistent or unit.fetching:
                    continue
                if live + unit.full_numel > self.max_live or (unit.swapper is not None and not unit.swapper.has_free()):
                    self._note_live()
                    return  # this event waits until something is released
                unit.start_gather()
                self._add_live(unit)
                live += unit.full_numel
            self.schedule.prefetched_through(position)
        self._note_live()

    def release_unit(self, unit: Unit) -> None:
        unit.release()
        if unit in self._live:
            del self._live[unit]
            self._live_elements -= unit.full_numel
            self._live_bytes -= unit.full_numel * unit.dtype.itemsize
        self.schedule.released(unit)

    def _add_live(self, unit: Unit) -> None:
        if unit not in self._live:
            self._live[unit] = None
            self._live_elements += unit.full_numel
            self._live_bytes += unit.full_numel * unit.dtype.itemsize

    def _note_live(self) -> None:
        self.live_peak_bytes = max(self.live_peak_bytes, self._live_bytes)

    def touched(self, param: torch.nn.Parameter) -> None:
        """A released parameter was used: inside a module's forward it becomes one of that module's
        (external) parameters and is gathered; anywhere else it is an error."""
        if not self._stack:
            raise not_gathered_error(param)
        module = self._stack[-1]
        unit = param.ds_unit
        if unit not in self.module_units[module]:
            self.module_units[module].append(unit)
            unit.users += 1  # released with the module's other units in _post_forward
            self.schedule.valid = False  # the module's event changed; re-record this step
        self._fetch(unit)

    # ---- ZeroStrategy ---------------------------------------------------------------------------
    def prepare_backward(self, boundary: bool) -> None:
        pass  # gradients are reduced every micro step, as at stage 2

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        scaled_backward(loss, self.loss_scaler.loss_scale, retain_graph)

    def step(self, max_norm: float) -> StepResult:
        if self.offload is not None:
            result, factor = unscale_and_clip_factor([u.grad_partition for u in self.trainable], self.loss_scaler,
                                                     self.dp.group if self.dp.size > 1 else None, self.check_overflow, max_norm)
            if result.applied:
                self.offload.step(factor)
                if self.param_swapper is not None:
                    self.param_swapper.flush()
                self._refresh_gathered()
            return result
        result = step_partitions(self.optimizer, [u.master for u in self.trainable], [u.grad_partition for u in self.trainable],
                                 self.loss_scaler, self.dp.group if self.dp.size > 1 else None, self.check_overflow, max_norm)
        if not result.applied:
            return result
        with torch.no_grad():
            for unit in self.trainable:
                if unit.partition.dtype != torch.float32:
                    unit.partition.copy_(unit.master)
        self._refresh_gathered()
        return result

    def _refresh_gathered(self) -> None:
        """Units that stay gathered across the step (persistent ones) take the updated shards."""
        for unit in self.units:
            if unit.full is not None and unit.group_key != FROZEN:
                unit.release(force=True)
                unit.gather()

    def zero_grad(self) -> None:
        for unit in self.trainable:
            unit.grad_partition.zero_()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for mod in self._patched_linears:
            del mod.forward  # back to the class's forward
        self._patched_linears = []
        if self.offload is not None:
            self.offload.close()
        if self.param_swapper is not None:
            self.param_swapper.close()

    def _offloaded(self, unit: Unit) -> bool:
        return self.offload_param is not None and not unit.persistent

    def memory_breakdown(self) -> dict[str, int]:
        persistent = [u.full for u in self.units if u.persistent and u.full is not None]
        parts = {
            "parameters": tensor_bytes([u.partition for u in self.units if not self._offloaded(u)]),
            **({"cpu_parameters": tensor_bytes([u.partition for u in self.units if self._offloaded(u) and u.partition is not None])}
               if self.offload_param is not None else {}),
            **({"nvme_parameters": self.param_swapper.swapped_bytes,
                "cpu_parameter_swap_buffers": tensor_bytes(self.param_swapper.buffers)} if self.param_swapper is not None else {}),
            "persistent_parameters": tensor_bytes(persistent),
            "gathered_parameters_peak": self.live_peak_bytes,
            "gradients": tensor_bytes([u.grad_partition for u in self.trainable]),
            "gradient_buckets_peak": self.reduce_peak_bytes,
        }
        if self.offload is not None:
            return {**parts, "master_weights": 0, "optimizer_states": 0, **self.offload.memory_breakdown()}
        return {
            **parts,
            "master_weights": tensor_bytes([u.master for u in self.trainable if u.dtype != torch.float32]),
            "optimizer_states": tensor_bytes(list(self.optimizer.state.values())) if self.optimizer is not None else 0,
        }

    # ---- whole weights: GatheredParameters, state dicts ------------------------------------------
    def refresh_masters(self, unit: Unit) -> None:
        """The unit's shards were rewritten (load, GatheredParameters with a modifier): masters follow."""
        if self.offload is not None and unit in self.segments:
            self.offload.reload_from_params([self.segments[unit]])
        if unit.master is not None and unit.partition.dtype != torch.float32:
            with torch.no_grad():
                unit.master.copy_(unit.partition)

    def consolidated_state_dict(self, exclude_frozen: bool = False, on_all_ranks: bool = False) -> dict[str, torch.Tensor]:
        """The module's full state dict, gathered unit by unit; every rank must call it.

        Only rank 0 of the data-parallel group receives it unless `on_all_ranks`.
        """
        keep = on_all_ranks or self.dp.rank == 0
        whole: dict[int, torch.Tensor] = {}
        for unit in self.units:
            was_gathered = unit.full is not None
            unit.gather()
            if keep:
                for p in unit.params:
                    whole[id(p)] = p.data.detach().to("cpu", copy=True)
            if not was_gathered:
                unit.release()
        if not keep:
            return {}
        frozen = {id(p) for p in self.module.parameters() if not p.requires_grad} if exclude_frozen else set()
        out = {}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            if id(tensor) in frozen:
                continue
            out[name] = whole[id(tensor)] if id(tensor) in whole else tensor.detach().to("cpu", copy=True)
        return out

    def load_module_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        own = self.module.state_dict(keep_vars=True)
        if strict:
            missing = [k for k in own if k not in state]
            unexpected = [k for k in state if k not in own]
            if missing or unexpected:
                raise RuntimeError(f"error loading the module state dict: missing keys {missing}, unexpected keys {unexpected}")
        touched: set[Unit] = set()
        with torch.no_grad():
            for name, tensor in own.items():
                if name not in state:
                    continue
                if is_partitioned(tensor):
                    tensor.ds_unit.load_whole(tensor, state[name])
                    touched.add(tensor.ds_unit)
                else:
                    tensor.copy_(state[name])
        for unit in touched:
            self.refresh_masters(unit)

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        units = []
        for unit, (master, state) in zip(self.trainable, self._masters_and_states()):
            units.append({
                "slots": [(s.name, s.numel, tuple(s.shape), s.offset, s.shard) for s in unit.slots],
                "master": master.detach().clone(),
                "state": snapshot_state(state),
            })
        return {**shard_header(self.optimizer, self.loss_scaler, "param_shards"),
                "rank": self.dp.rank, "world": self.dp.size, "units": units}

    def _masters_and_states(self) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """Each trainable unit's fp32 master and optimizer state, in `self.trainable` order."""
        if self.offload is None:
            return [(u.master, self.optimizer.state.get(u.master, {})) for u in self.trainable]
        found: dict[Unit, tuple[torch.Tensor, dict[str, Any]]] = {}
        for g in range(len(self.optimizer.param_groups)):
            master, state = self.offload.group_master_and_state(g)
            at = 0
            for unit in (u for u in self.trainable if u.group_key == g):
                n = unit.partition_size
                found[unit] = (master[at:at + n], {k: v[at:at + n] if _per_element(v, master) else v for k, v in state.items()})
                at += n
        return [found[u] for u in self.trainable]

    def sync_masters_from_model(self) -> None:
        for unit in self.trainable:
            self.refresh_masters(unit)

    def load_universal(self, universal: dict[str, Any]) -> None:
        params = universal["params"]
        rank = self.dp.rank
        loaded_units: dict[Unit, tuple[torch.Tensor, dict[str, Any]]] = {}
        with torch.no_grad():
            for unit in self.trainable:
                master_parts, states = [], {}
                for slot in unit.slots:
                    entry = params[slot.name]
                    master_parts.append(shard_of(entry["fp32"].reshape(-1).float(), slot.shard, rank))
                    for key, value in entry["state"].items():
                        if torch.is_tensor(value) and value.dim() > 0 and value.numel() == slot.numel:
                            states.setdefault(key, []).append(shard_of(value.reshape(-1), slot.shard, rank))
                        else:
                            states[key] = value
                master = torch.cat(master_parts)
                if unit.dtype != torch.float32 or self.offload is not None:
                    unit.save_partition(master)
                loaded = {k: (torch.cat(v) if isinstance(v, list) else (v.clone() if torch.is_tensor(v) else v))
                          for k, v in states.items()}
                loaded_units[unit] = (master, loaded)
                if self.offload is None:
                    unit.master.copy_(master)
                    if loaded:
                        self.optimizer.state[unit.master] = {k: v.to(unit.master.device) if isinstance(states[k], list) else v
                                                             for k, v in loaded.items()}
            if self.offload is not None:
                for g in range(len(self.optimizer.param_groups)):
                    members = [loaded_units[u] for u in self.trainable if u.group_key == g]
                    if not members:
                        continue
                    master = torch.cat([m for m, _ in members])
                    state = {k: torch.cat([st[k] for _, st in members]) if _per_element(v, members[0][0]) else v
                             for k, v in members[0][1].items()}
                    self.offload.load_group(g, master, state)
        restore_hyperparams(self.optimizer, universal.get("hyperparams"))
        if universal.get("loss_scaler"):
            self.loss_scaler.load_state_dict(universal["loss_scaler"])
        self._refresh_gathered()


def _per_element(value: Any, master: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.dim() > 0 and value.numel() == master.numel()


def _leaf_modules(root: torch.nn.Module, spec: dict[str, Any], granularity_threshold: int) -> set[torch.nn.Module]:
    """Modules fetched whole, with every submodule's parameters (DeepSpeed's "leaf modules").

    A module is a leaf when its class (name or dotted path) is in spec["classes"], its name is in
    spec["names"] or ends with one of spec["name_suffixes"], or when its granularity (parameters in
    its subtree per module in it) is below `stage3_module_granularity_threshold`. Mixture-of-experts
    blocks are leaves by default: only some experts run each step, which would otherwise change the
    recorded fetch order every step.
    """
    classes = set(spec.get("classes", ()))
    names = set(spec.get("names", ()))
    suffixes = tuple(spec.get("name_suffixes", ()))
    leaves: set[torch.nn.Module] = set()
    covered: set[torch.nn.Module] = set()
    for name, mod in root.named_modules():
        if mod in covered:
            continue
        cls = type(mod)
        leaf = (cls.__name__ in classes or f"{cls.__module__}.{cls.__qualname__}" in classes
                or name in names or (suffixes and name.endswith(suffixes)))
        if not leaf and granularity_threshold > 0 and mod is not root:
            subtree = list(mod.modules())
            numel = sum(getattr(p, "ds_numel", p.numel()) for p in mod.parameters())
            leaf = numel > 0 and numel / len(subtree) < granularity_threshold
        if leaf:
            leaves.add(mod)
            covered.update(mod.modules())
    return leaves


def _wrap_outputs(output: Any, strategy: Stage3Optimizer, module: torch.nn.Module) -> Any:
    """`output` with every tensor that requires grad passed through one _PreBackward."""
    found: list[torch.Tensor] = []
    _collect(output, found)
    if not found:
        return output
    wrapped = iter(_PreBackward.apply(strategy, module, *found))
    return _replace(output, wrapped)


def _collect(obj: Any, found: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad:
            found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, found)


def _replace(obj: Any, wrapped: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(wrapped) if obj.requires_grad else obj
    if isinstance(obj, tuple):
        items = [_replace(item, wrapped) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_replace(item, wrapped) for item in obj]
    if isinstance(obj, dict):
        for key in list(obj.keys()):
            obj[key] = _replace(obj[key], wrapped)  # in place: keeps ModelOutput and friends intact
        return obj
    return obj


__all__ = ["ParameterNotGatheredError", "Stage3Optimizer"]
