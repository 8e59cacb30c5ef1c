"""ZeRO-3 parameter storage: each rank keeps 1/N of every parameter, gathered on demand.

Every parameter is flattened, padded to a multiple of N*ALIGN elements and cut in N equal
shards; rank r keeps shard r. Parameters are grouped into *units* (the parameters one module
needs, split by optimizer group): a unit's shards on this rank lie end to end in one buffer,
`unit.partition`, which is what the optimizer steps (its fp32 copy, for 16-bit training).

Gathering a unit fills a buffer holding every parameter of the unit whole, one after another,
and points each parameter's `.data` at its piece. Releasing points `.data` back at an empty
tensor and switches the parameter's class to `ReleasedParameter`, whose only job is to catch
code that touches a parameter while it is not gathered. Because autograd keeps the Parameter
object (not its storage) for leaf tensors it saved, swapping `.data` back in before the
module's backward is enough for backward to see the weights.

A fresh buffer is allocated for every gather and never reused, so a view that some op saved
for backward (`weight.t()`) keeps reading the values it was computed from. Several units may be
gathered by one collective (`gather.GatherBatch`): their whole tensors are then views of one
buffer, freed once the last of them is released.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol, TypeGuard

import torch
import torch.distributed as dist

from ..comm.collectives import CommPolicy
from ..comm.topology import AxisGroup
from .layout import ALIGN


class ParameterNotGatheredError(RuntimeError):
    pass


def shard_numel(numel: int, world: int) -> int:
    """Elements per rank for a parameter of `numel` elements (a multiple of ALIGN, at least ALIGN)."""
    unit = ALIGN * world
    return max(unit, -(-numel // unit) * unit) // world


class Manager(Protocol):
    """Who decides what happens when code touches a released parameter."""

    def touched(self, param: ReleasedParameter) -> None:
        """Gather `param` now (inside a managed forward/backward) or raise ParameterNotGatheredError."""

    def touched_data(self, param: ReleasedParameter) -> None:
        """`param.data` is being read while released: gather it where that is safe, or leave it (the
        reader then sees an empty tensor, as DeepSpeed's users do)."""

    def refresh_masters(self, unit: "Unit") -> None:
        """The unit's shards were rewritten from whole values: update anything derived from them."""

    def release_unit(self, unit: "Unit") -> None:
        """Release the unit's gathered weights (and forget it as live)."""


# Calls on a released parameter that only read or set metadata, never its values.
_METADATA_METHODS = frozenset({
    "numel", "dim", "size", "element_size", "is_floating_point", "is_complex", "register_hook",
    "register_post_accumulate_grad_hook", "requires_grad_", "__repr__", "__format__", "data_ptr",
    "is_contiguous", "stride", "get_device", "__reduce_ex__", "__setstate__", "_is_view", "untyped_storage",
    "__deepcopy__", "nelement", "ndimension", "type", "is_shared", "share_memory_", "__hash__", "__eq__", "__len__",
    # Read as placeholders, as DeepSpeed's partitioned parameters are: Hugging Face's loaders call
    # `model.state_dict()` for its key names and `torch.equal` on tied weights, outside any gather.
    "detach", "equal",
})


_DATA = torch._C.TensorBase.__dict__["data"]  # reading `.data` calls this descriptor's __get__


class PartitionedParameter(torch.nn.Parameter):
    """A parameter ZeRO-3 partitions, as annotations see it: DeepSpeed's `ds_*` attributes, which
    `Unit._attach` sets on the parameter itself. Never instantiated: a gathered parameter keeps its
    own class (`is_partitioned` tells it apart), a released one is a ReleasedParameter."""

    ds_unit: Unit
    ds_slot: ShardSlot
    ds_shape: torch.Size
    ds_numel: int
    ds_tensor: torch.Tensor  # this rank's shard (empty when the shards are on NVMe)


class ReleasedParameter(PartitionedParameter):
    """The class a ZeRO-3 parameter has while its full data is not on this rank."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "__get__" and getattr(func, "__self__", None) is _DATA:
            if args and type(args[0]) is ReleasedParameter:
                args[0].ds_unit.manager.touched_data(args[0])  # `p.data.normal_()` in a zero.Init constructor
        elif name not in ("__get__", "__set__", "__delete__") and name not in _METADATA_METHODS:
            for arg in _tensor_args(args, kwargs):
                if type(arg) is ReleasedParameter:
                    arg.ds_unit.manager.touched(arg)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _tensor_args(args: tuple, kwargs: dict) -> list[Any]:
    found = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def not_gathered_error(param: ReleasedParameter) -> ParameterNotGatheredError:
    return ParameterNotGatheredError(
        f"parameter `{param.ds_slot.name}` (shape {tuple(param.ds_shape)}) is partitioned by ZeRO stage 3 and is not "
        "gathered here; wrap the code that reads or changes it in `with shardspeed.zero.GatheredParameters(params"
        "[, modifier_rank=0]):` (and pass modifier_rank if you change it)"
    )


@dataclass
class ShardSlot:
    """Where one parameter lives in its unit: its shard in `partition`, its whole in the gathered buffer."""

    name: str
    numel: int
    shape: torch.Size
    offset: int  # start of this rank's shard in unit.partition
    shard: int  # elements per rank (padded)
    full_offset: int  # start of the whole (padded) parameter in the gathered buffer
    cls: type  # the parameter's class when gathered (nn.Parameter or a user subclass)


class Unit:
    """The parameters gathered and released together, and this rank's shards of them."""

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], dp: AxisGroup, manager: Manager,
                 dtype: torch.dtype, device: torch.device, persistent: bool = False,
                 compute_device: torch.device | None = None, resident: bool = True,
                 storage: torch.Tensor | None = None, policy: CommPolicy | None = None) -> None:
        """`storage`: where this rank's shards live (a view of a larger buffer); allocated here when
        not given and `resident`. Not resident: the shards are on NVMe (`swapper` and `key` set by
        the owner before `adopt`)."""
        self.params = params
        self.dp = dp
        # Weak: parameters reach their unit, and a model that outlives its engine must not keep the
        # engine's manager (and its optimizer state) alive.
        self._manager = weakref.ref(manager)
        self.persistent = persistent
        self.policy = policy if policy is not None else CommPolicy.for_group(dp.group)
        self.slots: list[ShardSlot] = []
        offset = full = 0
        for p, name in zip(params, names):
            shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
            numel = shape.numel()
            shard = shard_numel(numel, dp.size)
            cls = p.ds_slot.cls if hasattr(p, "ds_slot") else type(p)
            self.slots.append(ShardSlot(name, numel, shape, offset, shard, full, cls))
            offset += shard
            full += shard * dp.size
        self.partition_size = offset
        self.full_numel = full
        self.dtype = dtype
        # Where the shards live (host memory with offload_param) and where gathered weights go.
        self.device = torch.device(device)
        self.compute_device = torch.device(compute_device) if compute_device is not None else self.device
        self.swapper: Any = None
        self.key: Any = None
        if storage is not None and storage.numel() != offset:
            raise ValueError(f"unit storage holds {storage.numel()} elements, its shards {offset}")
        self.partition: torch.Tensor | None = (storage if storage is not None else
                                               torch.zeros(offset, dtype=dtype, device=device) if resident else None)
        self._reading: tuple[torch.Tensor, torch.Tensor, Any] | None = None  # (pool buffer, partition, request)
        self._held: torch.Tensor | None = None  # the swap buffer `full` lies in (see `finish_gather`)
        self.full: torch.Tensor | None = None
        self._batch: Any = None  # the gather.GatherBatch in flight that fills `full`
        self.own_regions: Any = None  # where this rank's shards go in `full` (gather._Regions, made on first use)
        self.users = 0  # modules (or GatheredParameters blocks) using the gathered weights right now
        # Attributes the stage-3 manager and strategy keep per unit.
        self.group_key: Any = None
        self.home: Any = None  # unit_plan.Home: the flat buffer `partition` is a view of
        self.grad_partition: torch.Tensor | None = None
        self.pending = 0

    @property
    def manager(self) -> Manager:
        """Who handles touches of the released parameters; once that manager is gone (its engine
        was dropped), touching is an error and releasing needs nobody."""
        found = self._manager()
        return found if found is not None else _ORPHANED

    # ---- building ------------------------------------------------------------------------------
    def adopt(self) -> None:
        """Take this rank's shard of every parameter from wherever it is now, then release it.

        A parameter is either whole (`.data` holds it) or already partitioned in another unit
        (zero.Init built it): then its shard is copied over without any communication.
        """
        part = self.partition if self.partition is not None else torch.zeros(self.partition_size, dtype=self.dtype)
        with torch.no_grad():
            for p, slot in zip(self.params, self.slots):
                mine = part[slot.offset:slot.offset + slot.shard]
                if is_partitioned(p):
                    mine.copy_(p.ds_tensor)
                else:
                    mine.copy_(shard_of(p.data.reshape(-1), slot.shard, self.dp.rank))
                self._attach(p, slot)
        self.save_partition(part)
        self.release(force=True)

    def _attach(self, p: torch.nn.Parameter, slot: ShardSlot) -> None:
        # Set by name: this is what turns a parameter of any class into a PartitionedParameter.
        setattr(p, "ds_unit", self)
        setattr(p, "ds_slot", slot)
        setattr(p, "ds_shape", slot.shape)
        setattr(p, "ds_numel", slot.numel)
        # DeepSpeed's name for this rank's shard; empty when the shards are on NVMe.
        setattr(p, "ds_tensor", self.partition[slot.offset:slot.offset + slot.shard] if self.partition is not None
                else torch.empty(0, dtype=self.dtype))

    # ---- gather / release ----------------------------------------------------------------------
    @property
    def gathered(self) -> bool:
        return self.full is not None and self._batch is None

    @property
    def fetching(self) -> bool:
        """Gathered, or on its way (a collective or an NVMe read in flight)."""
        return self.full is not None or self._reading is not None

    @property
    def batchable(self) -> bool:
        """Can join a multi-unit gather now: its shards are in memory and it is not on its way yet."""
        return self.swapper is None and not self.fetching

    def start_gather(self) -> None:
        """Launch the collective that brings every rank's shards here (returns at once).

        With NVMe offload this only starts reading the shards; the collective starts when they
        have arrived, in `finish_gather`.
        """
        if self.fetching:
            return
        if self.swapper is not None:
            self._reading = self.swapper.read(self.key, self.partition_size, self.dtype)
            return
        from .gather import GatherBatch

        GatherBatch.launch([self])

    def finish_gather(self) -> None:
        """Wait for the gather and point every parameter at its whole tensor."""
        if not self.fetching:
            self.start_gather()
        if self._reading is not None:
            from .gather import GatherBatch

            buf, part, request = self._reading
            request.wait()
            self._reading = None
            if self._can_hold(part):
                # One rank: the partition is laid out as the whole weights are, so the buffer it was
                # read into serves as them until release (no copy, no allocation). Only where autograd
                # records nothing: a saved view of a weight would outlive the buffer's next use.
                self._held, self.full = buf, part
                self.install()
                return
            GatherBatch.launch([self], sources=[part]).wait()  # the pool buffer is reused once the collective has read it
            self.swapper.release(buf)
            return
        if self._batch is not None:
            self._batch.wait()

    def own_copy(self) -> None:
        """Weights lying in a swap buffer move to a tensor of their own (autograd is about to record them,
        and a saved view must not see the buffer reused); the buffer goes back to the pool."""
        if self._held is None or self.full is None:
            return
        self.full = self.full.clone()
        self.install()
        self.swapper.release(self._held)
        self._held = None

    def _can_hold(self, part: torch.Tensor) -> bool:
        return (not torch.is_grad_enabled() and not self.policy.communicates(self.dp)
                and part.device == self.compute_device and part.numel() == self.full_numel)

    def gather(self) -> None:
        self.start_gather()
        self.finish_gather()

    def install(self) -> None:
        """Point every parameter at its piece of `full` (gathered)."""
        assert self.full is not None
        for p, slot in zip(self.params, self.slots):
            p.__class__ = slot.cls
            p.data = self.full[slot.full_offset:slot.full_offset + slot.numel].view(slot.shape)

    def release(self, force: bool = False) -> None:
        """Drop the gathered weights (persistent units keep theirs unless forced)."""
        if self.persistent and not force:
            return
        if self._batch is not None or self._reading is not None:
            self.finish_gather()
        empty = torch.empty(0, dtype=self.dtype, device=self.compute_device)
        for p in self.params:
            p.data = empty
            p.__class__ = ReleasedParameter
        self.full = None
        if self._held is not None:
            self.swapper.release(self._held)
            self._held = None

    # ---- writing whole values back into shards ---------------------------------------------------
    def load_partition(self) -> torch.Tensor:
        """This rank's shards (read from the drive when they live there)."""
        if self.partition is not None:
            return self.partition
        return self.swapper.read_now(self.key, self.partition_size, self.dtype)

    def save_partition(self, values: torch.Tensor) -> None:
        """Make `values` this rank's shards (written back to the drive when they live there)."""
        if self.swapper is not None:
            self.swapper.write(self.key, values, self.dtype)
        elif values is not self.partition:
            assert self.partition is not None  # without a swapper the shards are in memory
            with torch.no_grad():
                self.partition.copy_(values.reshape(-1))

    def absorb_full(self) -> None:
        """After the gathered weights changed on every rank alike, copy our shards of them back."""
        part = self.load_partition()
        with torch.no_grad():
            for p, slot in zip(self.params, self.slots):
                part[slot.offset:slot.offset + slot.shard].copy_(shard_of(p.data.reshape(-1), slot.shard, self.dp.rank))
        self.save_partition(part)

    def keep_values_of(self, rank: int) -> None:
        """The gathered weights as data-parallel rank `rank` has them become every rank's shards."""
        if self.dp.size > 1 and self.full is not None:
            dist.broadcast(self.full, src=self.dp.ranks[rank], group=self.dp.group)  # one collective for the unit
        self.absorb_full()

    def load_whole(self, param: PartitionedParameter, value: torch.Tensor) -> None:
        """Set one parameter from its whole value (same on every rank): our shard, and the gathered copy."""
        slot = param.ds_slot
        with torch.no_grad():
            flat = value.detach().reshape(-1).to(self.dtype)
            if flat.numel() != slot.numel:
                raise ValueError(f"`{slot.name}`: expected {slot.numel} elements ({tuple(slot.shape)}), got {flat.numel()}")
            part = self.load_partition()
            part[slot.offset:slot.offset + slot.shard].copy_(shard_of(flat, slot.shard, self.dp.rank))
            self.save_partition(part)
            if self.gathered:
                param.data.copy_(flat.view(slot.shape))


class _Orphaned:
    """The manager of units whose manager is gone."""

    def touched(self, param: ReleasedParameter) -> None:
        raise not_gathered_error(param)

    def touched_data(self, param: ReleasedParameter) -> None:
        pass

    def refresh_masters(self, unit: Unit) -> None:
        pass

    def release_unit(self, unit: Unit) -> None:
        unit.release()


_ORPHANED = _Orphaned()


def shard_of(flat: torch.Tensor, shard: int, rank: int) -> torch.Tensor:
    """Rank's shard of a flat tensor padded with zeros to shard * world elements."""
    start = rank * shard
    piece = flat[start:start + shard]
    if piece.numel() == shard:
        return piece
    out = torch.zeros(shard, dtype=flat.dtype, device=flat.device)
    out[:piece.numel()] = piece
    return out


def is_partitioned(p: torch.Tensor) -> TypeGuard[PartitionedParameter]:
    return hasattr(p, "ds_unit")
