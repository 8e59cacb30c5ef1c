"""Rank arithmetic over named parallel axes, and the process groups they imply.

`ProcessTopology` is pure arithmetic (testable for any world size without processes) with
DeepSpeed's rank ordering: the last axis varies fastest. `Topology` adds the torch.distributed
groups. It is built once and passed to whatever needs a group; nothing looks it up globally.
"""
from __future__ import annotations

import enum
import itertools
import math
from collections import namedtuple
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .groups import groups_for


def _coord_class(axes: list[str]) -> Callable[..., tuple[int, ...]]:
    """A namedtuple class with one field per axis; its fields are only known at run time."""
    return namedtuple("ProcessCoord", axes)


class ProcessTopology:
    """A mapping between global ranks and coordinates on named axes (row-major, last axis fastest)."""

    def __init__(self, axes: Sequence[str], dims: Sequence[int]) -> None:
        if len(axes) != len(dims) or len(set(axes)) != len(axes):
            raise ValueError(f"axes {list(axes)} and dims {list(dims)} must pair up, with distinct names")
        if any(d < 1 for d in dims):
            raise ValueError(f"every axis size must be positive, got {dict(zip(axes, dims))}")
        self.axes = list(axes)
        self.dims = list(dims)
        # DeepSpeed hands out coordinates as a namedtuple, so `get_coord(r).pipe` works.
        self.ProcessCoord = _coord_class(self.axes)
        self._coords = [self.ProcessCoord(*c) for c in itertools.product(*(range(d) for d in dims))]

    def world_size(self) -> int:
        return math.prod(self.dims)

    def get_dim(self, axis: str) -> int:
        return self.dims[self.axes.index(axis)] if axis in self.axes else 1

    def get_axis_names(self) -> list[str]:
        return list(self.axes)

    def get_coord(self, rank: int) -> Any:
        """This rank's coordinates, a namedtuple with one field per axis."""
        if not 0 <= rank < self.world_size():
            raise ValueError(f"rank {rank} is outside a topology of {self.world_size()} ranks")
        return self._coords[rank]

    def get_rank(self, **coords: int) -> int:
        if set(coords) != set(self.axes):
            raise ValueError(f"get_rank needs a coordinate for each of {self.axes}, got {sorted(coords)}")
        rank = 0
        for axis, dim in zip(self.axes, self.dims):
            if not 0 <= coords[axis] < dim:
                raise ValueError(f"coordinate {axis}={coords[axis]} is outside 0..{dim - 1}")
            rank = rank * dim + coords[axis]
        return rank

    def get_axis_comm_lists(self, axis: str) -> list[list[int]]:
        """The rank lists that communicate along `axis` (all other coordinates fixed)."""
        if axis not in self.axes:
            return [[r] for r in range(self.world_size())]
        others = [a for a in self.axes if a != axis]
        lists = []
        for fixed in itertools.product(*(range(self.get_dim(a)) for a in others)):
            base = dict(zip(others, fixed))
            lists.append([self.get_rank(**base, **{axis: i}) for i in range(self.get_dim(axis))])
        return lists

    def get_axis_list(self, axis: str, idx: int) -> list[int]:
        """Ranks whose coordinate on `axis` equals `idx`."""
        return [r for r in range(self.world_size()) if getattr(self.get_coord(r), axis) == idx]

    def filter_match(self, **filters: int) -> list[int]:
        return [r for r in range(self.world_size()) if all(getattr(self.get_coord(r), k) == v for k, v in filters.items())]

    def __repr__(self) -> str:
        return f"ProcessTopology({dict(zip(self.axes, self.dims))})"


class PipeDataParallelTopology(ProcessTopology):
    """DeepSpeed's pipeline x data layout: data-parallel peers are adjacent ranks."""

    def __init__(self, num_pp: int, num_dp: int) -> None:
        super().__init__(["pipe", "data"], [num_pp, num_dp])


class PipeModelDataParallelTopology(ProcessTopology):
    """DeepSpeed's pipeline x data x model (tensor) layout: tensor peers are adjacent ranks."""

    def __init__(self, num_pp: int, num_mp: int, num_dp: int) -> None:
        super().__init__(["pipe", "data", "model"], [num_pp, num_dp, num_mp])


class Axis(str, enum.Enum):
    """The parallel axes, and groups derived from them, that a rank belongs to.

    DATA, PIPE and TENSOR are the grid's axes (DeepSpeed's `data`, `pipe`, `model`). EXPERT splits
    the data axis into consecutive chunks of `ep_size` ranks that share one set of experts;
    EXPERT_DATA links the ranks holding the same experts (across those chunks), over which expert
    gradients are averaged. MODEL_PARALLEL is one model replica: the pipeline stages and tensor
    shards of one data-parallel index, over which a gradient norm is completed.
    """

    DATA = "data"
    PIPE = "pipe"
    TENSOR = "tensor"
    EXPERT = "expert"
    EXPERT_DATA = "expert_data"
    MODEL_PARALLEL = "model_parallel"

    @classmethod
    def parse(cls, name: "str | Axis") -> "Axis":
        """An axis from its name or an alias (dp, pp, tp, model, ep, edp, mp)."""
        if isinstance(name, Axis):
            return name
        key = _AXIS_ALIASES.get(name, name)
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise KeyError(f"unknown parallel axis {name!r}; known: {known} (aliases: {', '.join(_AXIS_ALIASES)})") from None


# Short names, and the name DeepSpeed's topologies use for the tensor axis.
_AXIS_ALIASES = {"dp": "data", "pp": "pipe", "tp": "tensor", "model": "tensor", "ep": "expert",
                 "edp": "expert_data", "mp": "model_parallel"}
# Where each grid axis sits in a ProcessTopology (DeepSpeed's names).
_GRID_NAME = {Axis.DATA: "data", Axis.PIPE: "pipe", Axis.TENSOR: "model"}


@dataclass(frozen=True)
class AxisGroup:
    """This rank's group along one axis, with its size and this rank's index in it."""

    group: dist.ProcessGroup | None
    ranks: tuple[int, ...]
    rank: int

    @property
    def size(self) -> int:
        return len(self.ranks)


class Topology:
    """Named parallel axes over the launched processes, with one torch.distributed group per axis.

    This is the one place parallel groups are made: `initialize`, `PipelineModule`, `zero.Init`,
    `tp_model_init` and `from_mpu` all build a Topology. Groups come from `comm.groups`, which
    creates each distinct rank list once per process, so a second engine reuses the first one's
    groups. Building is collective: every rank builds the same topologies in the same order.
    """

    def __init__(self, grid: ProcessTopology, ep_size: int = 1, given: dict[str, AxisGroup] | None = None) -> None:
        """`given`: groups that already exist for some grid axes ("data", "pipe", "model": a Megatron
        `mpu`'s); the rest are made here."""
        if not dist.is_initialized():
            raise RuntimeError("call shardspeed.init_distributed() before building a Topology")
        if grid.world_size() != dist.get_world_size():
            raise ValueError(f"topology {grid} covers {grid.world_size()} ranks but the job has {dist.get_world_size()}")
        dp = grid.get_dim("data")
        if ep_size < 1 or dp % ep_size:
            raise ValueError(f"expert-parallel size {ep_size} must divide the data-parallel size {dp}")
        self.grid = grid
        self.ep_size = ep_size
        self.global_rank = dist.get_rank()
        self._groups: dict[Axis, AxisGroup] = {}
        given = given or {}
        for axis, grid_name in _GRID_NAME.items():
            self._groups[axis] = given[grid_name] if grid_name in given else self._make(grid.get_axis_comm_lists(grid_name))
        data_lists = _all_lists(self._groups[Axis.DATA]) if "data" in given else grid.get_axis_comm_lists("data")
        self._data_lists = data_lists
        self._groups[Axis.EXPERT], self._groups[Axis.EXPERT_DATA] = self.expert_axes(ep_size)
        replicas = [sorted(dl[i] for dl in data_lists) for i in range(dp)]
        self._groups[Axis.MODEL_PARALLEL] = self._make(replicas)

    # ---- the ways users and the engine describe a layout -------------------------------------------
    @classmethod
    def build(cls, *, pipe: int = 1, tensor: int = 1, expert: int = 1) -> "Topology":
        """pipe x data x tensor over the whole job (tensor peers adjacent, DeepSpeed's order); the data
        size is what the world leaves."""
        world = dist.get_world_size()
        if pipe < 1 or tensor < 1 or world % (pipe * tensor):
            raise ValueError(f"pipeline size {pipe} x tensor-parallel size {tensor} must divide the world size {world}")
        return cls(PipeModelDataParallelTopology(num_pp=pipe, num_mp=tensor, num_dp=world // (pipe * tensor)), ep_size=expert)

    @classmethod
    def data_parallel(cls) -> "Topology":
        """Every rank on the data axis: plain data parallelism."""
        return cls(ProcessTopology(["data"], [dist.get_world_size()]))

    @classmethod
    def from_mpu(cls, mpu: Any) -> "Topology":
        """The groups of a Megatron-style model-parallel unit (`initialize(mpu=...)`).

        Reads `get_data_parallel_group`, `get_tensor_model_parallel_group` (or the older
        `get_model_parallel_group`) and, when present, `get_pipeline_model_parallel_group`.
        """
        def group_of(*names: str) -> dist.ProcessGroup | None:
            for name in names:
                if callable(getattr(mpu, name, None)):
                    return getattr(mpu, name)()
            return None

        data = group_of("get_data_parallel_group")
        if data is None:
            raise TypeError(f"mpu {type(mpu).__name__} has no get_data_parallel_group(); it must follow Megatron's mpu interface")
        tensor = group_of("get_tensor_model_parallel_group", "get_model_parallel_group")
        pipe = group_of("get_pipeline_model_parallel_group")
        given = {"data": axis_of_group(data)}
        if tensor is not None:
            given["model"] = axis_of_group(tensor)
        if pipe is not None:
            given["pipe"] = axis_of_group(pipe)
        world = dist.get_world_size()
        dp = given["data"].size
        tp = given["model"].size if "model" in given else 1
        pp = given["pipe"].size if "pipe" in given else 1
        if dp * tp * pp != world:
            raise ValueError(f"mpu groups do not tile the job: data {dp} x tensor {tp} x pipeline {pp} != world size {world}")
        return cls(PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp), given=given)

    def expert_axes(self, ep_size: int, data_before_expert: bool = False) -> tuple[AxisGroup, AxisGroup]:
        """This rank's (expert-parallel, expert-data-parallel) groups for experts split `ep_size` ways
        over the data axis (collective; groups are made once and shared).

        DeepSpeed's default layout (E+D) puts expert peers on adjacent data ranks: at data 4 and
        ep 2, expert [0,1],[2,3] and expert-data [0,2],[1,3]. `data_before_expert` (DeepSpeed's
        `use_data_before_expert_parallelism`) swaps them: expert-data adjacent, expert strided.
        """
        dp = self.grid.get_dim("data")
        if ep_size < 1 or dp % ep_size:
            raise ValueError(f"expert-parallel size {ep_size} must divide the data-parallel size {dp}")
        chunks = [dl[i:i + ep_size] for dl in self._data_lists for i in range(0, dp, ep_size)]
        strided = [dl[i::ep_size] for dl in self._data_lists for i in range(ep_size)]
        if data_before_expert:
            edp = dp // ep_size
            chunks = [dl[i:i + edp] for dl in self._data_lists for i in range(0, dp, edp)]
            strided = [dl[i::edp] for dl in self._data_lists for i in range(edp)]
            return self._make(strided), self._make(chunks)
        return self._make(chunks), self._make(strided)

    def _make(self, rank_lists: list[list[int]]) -> AxisGroup:
        made = groups_for(rank_lists)
        for ranks in rank_lists:
            if self.global_rank in ranks:
                return AxisGroup(made[tuple(ranks)], tuple(ranks), ranks.index(self.global_rank))
        raise AssertionError("every rank lies on every axis")

    def axis(self, name: "str | Axis") -> AxisGroup:
        """This rank's group on axis `name` (an `Axis`, its value, or an alias: dp, pp, tp, model, ep)."""
        return self._groups[Axis.parse(name)]

    def size(self, name: "str | Axis") -> int:
        return self.axis(name).size

    def describe(self) -> str:
        """'dp=2 pp=1 tp=1 ep=1', for log lines."""
        g = self.grid
        return f"dp={g.get_dim('data')} pp={g.get_dim('pipe')} tp={g.get_dim('model')} ep={self.ep_size}"


def axis_of_group(group: dist.ProcessGroup) -> AxisGroup:
    """An existing process group as an AxisGroup (this rank must belong to it)."""
    ranks = tuple(dist.get_process_group_ranks(group))
    if dist.get_rank() not in ranks:
        raise ValueError(f"rank {dist.get_rank()} is not in the process group {ranks} it was given")
    return AxisGroup(group, ranks, ranks.index(dist.get_rank()))


def _all_lists(axis: AxisGroup) -> list[list[int]]:
    """Every rank's group on one axis, in first-rank order (collective)."""
    everyone: list[tuple[int, ...]] = [() for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, axis.ranks)
    return [list(r) for r in sorted(set(everyone))]
