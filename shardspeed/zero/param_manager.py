"""The stage-3 parameter manager: partitioned parameters gathered per module while it runs.

Each rank keeps 1/N of every parameter (`param_shards`), cut into units (`unit_plan`). Forward hooks
gather the units a module needs just before it runs and release them after, unless the recorded
schedule says they are used again soon (`stage3_max_reuse_distance`) and the live cap allows it.
Outputs are wrapped so that, in backward, the module's units are gathered again before its
gradients are computed. While a module runs, the next units in the schedule are gathered together,
by one collective, up to `stage3_prefetch_bucket_size` elements, never exceeding
`stage3_max_live_parameters` gathered elements (a module's own units always are).

The manager needs no optimizer and no engine: a stage-3 model in `eval()` / `no_grad` runs its
forwards through these hooks alone. A gradient reducer tells it (`grad_consumed`) when a unit's
gradients have been taken, so the unit can be released during backward. `gathered_all()` gathers
every unit once and suspends the hooks until it exits: the building block for fast generation.

Module hooks reach the manager through a weak reference, so dropping the engine that owns a
manager frees it even while the model lives on.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ..comm.collectives import CommPolicy
from ..comm.topology import AxisGroup
from ..config.sections import AioConfig, ZeroConfig
from ..offload.param_swap import ParamSwapper
from .base import tensor_bytes
from .fetch_schedule import FetchSchedule
from . import whole_weights
from .gather import gather_in_batches, launch_gathers
from .module_hooks import attach_hooks, detach_hooks, wrap_outputs
from .param_shards import ReleasedParameter, Unit, is_partitioned, not_gathered_error
from .unit_plan import FROZEN, GroupKey, Home, plan_units


class ParameterManager:
    """Partitions `module`'s parameters (ZeRO stage 3) and gathers them around each module's use.

    `group_of` maps trainable parameters to their optimizer param group (absent: frozen); `axis_of`
    gives the group each key is partitioned over (default: `data` for all).
    """

    def __init__(self, module: torch.nn.Module, zero: ZeroConfig, data: AxisGroup, *,
                 group_of: dict[torch.nn.Parameter, int] | None = None,
                 axis_of: Callable[[GroupKey], AxisGroup] | None = None,
                 aio: AioConfig | None = None) -> None:
        self.module = module
        self.prefetch_elements = zero.prefetch_bucket_size
        self.max_live = zero.max_live_parameters
        self.max_reuse = zero.max_reuse_distance
        offload = zero.offload_param
        self.offload_param = offload if offload is not None and offload.device != "none" else None
        self.schedule = FetchSchedule()
        self._live: dict[Unit, None] = {}  # gathered (or being gathered) non-persistent units, in order
        self._live_elements = 0
        self._live_bytes = 0
        self.live_peak_bytes = 0
        self._stack: list[torch.nn.Module] = []
        self._in_backward = False
        self._in_forward_pass = False
        self._suspended = False  # inside gathered_all(): the module hooks do nothing
        # Told when GatheredParameters (or a load) rewrote a unit's shards: the strategy's masters follow.
        self.on_shards_rewritten: Callable[[Unit], None] | None = None
        plan = plan_units(module, group_of or {}, axis_of or (lambda key: data), self,
                          persistence_threshold=zero.param_persistence_threshold,
                          model_persistence_threshold=zero.model_persistence_threshold,
                          leaf_spec=zero.leaf_module, granularity_threshold=zero.module_granularity_threshold,
                          offload=self.offload_param)
        self.units = plan.units
        self.module_units = plan.module_units
        self.flat: dict[Home, torch.Tensor] = plan.flat
        self.trainable = [u for u in self.units if u.group_key != FROZEN]
        self.param_swapper: ParamSwapper | None = None
        if self.offload_param is not None and self.offload_param.device == "nvme":
            self._swap_partitions(aio or AioConfig())
        for unit in self.units:
            unit.adopt()
        gather_in_batches([u for u in self.units if u.persistent], self.prefetch_elements)
        handles, patched = attach_hooks(self, zero.memory_efficient_linear)
        # Dropping the manager (its engine) takes its hooks off the model, which may live on.
        self._detach = weakref.finalize(self, detach_hooks, handles, patched)

    # ---- set-up ------------------------------------------------------------------------------
    def _swap_partitions(self, aio: AioConfig) -> None:
        """offload_param nvme: the non-persistent units' shards go to a swap file (persistent ones stay here)."""
        swapped = [u for u in self.units if u.partition is None]
        if not swapped:
            return
        assert self.offload_param is not None
        regions: dict[Hashable, tuple[int, torch.dtype]] = {i: (u.partition_size, u.dtype) for i, u in enumerate(swapped)}
        self.param_swapper = ParamSwapper(regions, self.offload_param, aio, rank=dist.get_rank() if dist.is_initialized() else 0,
                                          pin=self.offload_param.pin_memory and swapped[0].compute_device.type == "cuda")
        for i, unit in enumerate(swapped):
            unit.swapper, unit.key = self.param_swapper, i

    def set_policy(self, policy: CommPolicy) -> None:
        """Gather every unit with `policy` (tests force NCCL's implementation on gloo with it)."""
        for unit in self.units:
            unit.policy = policy

    # ---- forward --------------------------------------------------------------------------------
    def pre_forward(self, module: torch.nn.Module) -> None:
        """`module` is about to run: gather its units (and prefetch what comes next)."""
        if self._suspended:
            return
        if not self._stack and not self._in_backward:
            if self._in_forward_pass:
                self._end_step()  # a second forward with no backward in between starts a new step
            self._begin_forward()
        self._stack.append(module)
        units = self.module_units[module]
        if not units:
            return
        self.schedule.event("F", module, units)
        self._fetch(units)
        for unit in units:
            unit.users += 1
        self._prefetch()

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        """`module` has run: release what is not needed soon; wrap its outputs for backward."""
        if self._suspended:
            return output
        self._stack.pop()
        units = self.module_units[module]
        for unit in units:
            unit.users -= 1
            # A forward inside backward is activation checkpointing's recompute (non-reentrant: the
            # recomputed ops keep references to the gathered weights): the unit stays until its
            # gradients are in (grad_consumed) or the step ends.
            if unit.users == 0 and not self._in_backward:
                self._after_forward_use(unit)
        if units and torch.is_grad_enabled():
            output = wrap_outputs(output, self, module)
        if not self._stack and not self._in_backward and not torch.is_grad_enabled():
            self._end_step()  # no backward will follow (evaluation)
        return output

    def _begin_forward(self) -> None:
        if not self._in_forward_pass:
            self._in_forward_pass = True
            self.schedule.begin_step()

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
        ref = weakref.ref(self)
        torch.autograd.Variable._execution_engine.queue_callback(lambda: _end_step(ref))

    def pre_backward(self, module: torch.nn.Module) -> None:
        """`module`'s backward is next: gather its units (called from its outputs' grad function)."""
        if self._suspended:
            return
        self._begin_backward()
        units = self.module_units[module]
        self.schedule.event("B", module, units)
        self._fetch(units)
        self._prefetch()

    def grad_consumed(self, param: torch.nn.Parameter) -> None:
        """The reducer has taken `param`'s gradient; once a unit's are all in, it is released."""
        if self._suspended:
            return
        self._begin_backward()
        assert is_partitioned(param)  # stage 3 reduces only the parameters of its units
        unit = param.ds_unit
        unit.pending -= 1
        if unit.pending == 0 and not unit.persistent and unit.users == 0:
            self.release_unit(unit)

    def _end_step(self) -> None:
        for unit in list(self._live):
            if unit.users == 0:
                self.release_unit(unit)
        self.schedule.end_step()
        self._in_backward = False
        self._in_forward_pass = False

    # ---- gathering ------------------------------------------------------------------------------
    def _fetch(self, units: list[Unit]) -> None:
        """Gather what a module needs now; those not on their way yet go in one collective."""
        if self.param_swapper is not None and torch.is_grad_enabled():
            for unit in units:
                unit.own_copy()  # gathered under no_grad into a swap buffer: autograd may keep views of it
        missing = [u for u in units if not u.persistent and not u.gathered]
        if not missing:
            return
        launch_gathers([u for u in missing if u.batchable])
        for unit in missing:
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
        if self.schedule.prefetched_ahead() > self.prefetch_elements // 2:
            return  # enough on its way: top up in batches of half a bucket or more, not unit by unit
        live = self._live_elements
        batch: dict[Unit, None] = {}
        for position, units in self.schedule.prefetch_window(self.prefetch_elements):
            for unit in units:
                if unit.persistent or unit.fetching or unit in batch:
                    continue
                if live + unit.full_numel > self.max_live or (unit.swapper is not None and not unit.swapper.has_free()):
                    launch_gathers(list(batch))
                    self._note_live()
                    return  # this event waits until something is released
                if unit.swapper is not None:
                    unit.start_gather()  # starts reading the shards from the drive
                else:
                    batch[unit] = None
                self._add_live(unit)
                live += unit.full_numel
            self.schedule.prefetched_through(position)
        launch_gathers(list(batch))
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

    def touched(self, param: ReleasedParameter) -> None:
        """A released parameter was used: inside a module's forward it becomes one of that module's
        (external) parameters and is gathered; anywhere else it is an error."""
        if not self._stack:
            raise not_gathered_error(param)
        module = self._stack[-1]
        unit = param.ds_unit
        if unit not in self.module_units[module]:
            self.module_units[module].append(unit)
            unit.users += 1  # released with the module's other units in post_forward
            self.schedule.valid = False  # the module's event changed; re-record this step
        self._fetch([unit])

    def touched_data(self, param: ReleasedParameter) -> None:
        """Reading `.data` of a released parameter gathers nothing: the reader sees an empty tensor."""

    def refresh_masters(self, unit: Unit) -> None:
        """The unit's shards were rewritten from whole values: whatever is derived from them follows."""
        if self.on_shards_rewritten is not None:
            self.on_shards_rewritten(unit)

    @contextmanager
    def gathered_all(self) -> Iterator[None]:
        """Every unit gathered once (batched collectives), module hooks suspended until exit, then released.

        Forwards inside run no collective at all. Every rank of each unit's group must enter it.
        """
        if self._suspended:
            yield
            return
        units = [u for u in self.units if not u.persistent]
        for unit in units:
            unit.users += 1
            self._add_live(unit)
        gather_in_batches(units, self.prefetch_elements)
        self._note_live()
        self._suspended = True
        try:
            yield
        finally:
            self._suspended = False
            for unit in units:
                unit.users -= 1
                if unit.users == 0:
                    self.release_unit(unit)

    def refresh_gathered(self) -> None:
        """Trainable units that stay gathered across a step (persistent ones) take their updated shards."""
        stale = [u for u in self.trainable if u.full is not None]
        for unit in stale:
            unit.release(force=True)
        gather_in_batches(stale, self.prefetch_elements)

    # ---- whole weights: state dicts ------------------------------------------------------------------
    def consolidated_state_dict(self, keep: bool, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
        """The module's full state dict (every rank must call it; only ranks with `keep` receive it)."""
        return whole_weights.consolidated_state_dict(self.module, self.units, keep, exclude_frozen)

    def load_module_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Whole weights into every rank's shards (and gathered copies); the strategy's masters follow."""
        for unit in whole_weights.load_state_dict(self.module, state, strict):
            self.refresh_masters(unit)

    # ---- reporting and teardown -------------------------------------------------------------------
    def offloaded(self, unit: Unit) -> bool:
        return self.offload_param is not None and not unit.persistent

    def memory_breakdown(self) -> dict[str, int]:
        persistent = [u.full for u in self.units if u.persistent and u.full is not None]
        parts = {"parameters": tensor_bytes([u.partition for u in self.units if not self.offloaded(u)])}
        if self.offload_param is not None:
            parts["cpu_parameters"] = tensor_bytes([u.partition for u in self.units if self.offloaded(u) and u.partition is not None])
        if self.param_swapper is not None:
            parts["nvme_parameters"] = self.param_swapper.swapped_bytes
            parts["cpu_parameter_swap_buffers"] = tensor_bytes(self.param_swapper.buffers)
        parts["persistent_parameters"] = tensor_bytes(persistent)
        parts["gathered_parameters_peak"] = self.live_peak_bytes
        return parts

    def close(self) -> None:
        """Remove the hooks and the memory-efficient linears; close the parameter swap file."""
        self._detach()
        if self.param_swapper is not None:
            self.param_swapper.close()


def _end_step(ref: "weakref.ReferenceType[ParameterManager]") -> None:
    manager = ref()
    if manager is not None:
        manager._end_step()


__all__ = ["ParameterManager"]
