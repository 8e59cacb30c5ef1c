"""Rank arithmetic over named parallel axes, and the process groups they imply.

`ProcessTopology` is pure arithmetic (testable for any world size without processes) with
DeepSpeed's rank ordering: the last axis varies fastest. `Topology` adds the torch.distributed
groups. It is built once and passed to whatever needs a group; nothing looks it up globally.
"""
from __future__ import annotations

import itertools
import math
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


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
        self.ProcessCoord = namedtuple("ProcessCoord", self.axes)
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


# Our axis names, and the names DeepSpeed's topologies use for the same thing.
_AXIS_ALIASES = {"dp": "data", "pp": "pipe", "tp": "model", "tensor": "model", "data": "data", "pipe": "pipe", "model": "model"}


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

    Axes: `data`, `pipe`, `tensor` (DeepSpeed's `model`), and `expert`, which subdivides the
    data axis (expert-parallel peers are adjacent data-parallel ranks). All groups are created
    in the constructor, which every rank must call in the same order (group creation is collective).
    """

    def __init__(self, grid: ProcessTopology, ep_size: int = 1, given: dict[str, AxisGroup] | None = None) -> None:
        """`given`: groups that already exist for some axes (a Megatron `mpu`'s); the rest are made here."""
        if not dist.is_initialized():
            raise RuntimeError("call shardspeed.init_distributed() before building a Topology")
        if grid.world_size() != dist.get_world_size():
            raise ValueError(f"topology {grid} covers {grid.world_size()} ranks but the job has {dist.get_world_size()}")
        dp = grid.get_dim("data")
        if dp % ep_size:
            raise ValueError(f"expert-parallel size {ep_size} must divide the data-parallel size {dp}")
        self.grid = grid
        self.ep_size = ep_size
        self.global_rank = dist.get_rank()
        self._groups: dict[str, AxisGroup] = {}
        given = given or {}
        for axis in ("data", "pipe", "model"):
            self._groups[axis] = given[axis] if axis in given else self._make(grid.get_axis_comm_lists(axis))
        data_lists = _all_lists(self._groups["data"]) if "data" in given else grid.get_axis_comm_lists("data")
        self._groups["expert"] = self._make([dl[i:i + ep_size] for dl in data_lists for i in range(0, dp, ep_size)])
        self._groups["expert_data"] = self._make([dl[i::ep_size] for dl in data_lists for i in range(ep_size)])
        # One model replica: the ranks that hold its pipeline stages and tensor shards. A gradient
        # norm adds its squares over this group (after the data-parallel reduction).
        replicas = [sorted(r for dl in data_lists for r in dl[i:i + 1]) for i in range(dp)]
        self._groups["model_parallel"] = self._make(replicas)

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

    @classmethod
    def data_parallel(cls) -> "Topology":
        """Every rank on the data axis: plain data parallelism."""
        return cls(ProcessTopology(["data"], [dist.get_world_size()]))

    def _make(self, rank_lists: list[list[int]]) -> AxisGroup:
        mine: AxisGroup | None = None
        world = dist.get_world_size()
        for ranks in rank_lists:
            if len(ranks) == world:
                group = dist.group.WORLD  # no new communicator for the whole world
            else:
                group = dist.new_group(ranks)
            if self.global_rank in ranks:
                mine = AxisGroup(group, tuple(ranks), ranks.index(self.global_rank))
        assert mine is not None, "every rank lies on every axis"
        return mine

    def axis(self, name: str) -> AxisGroup:
        """This rank's group on axis `name` (data|dp, pipe|pp, tensor|tp|model, expert|ep, expert_data, model_parallel)."""
        key = {"ep": "expert"}.get(name, _AXIS_ALIASES.get(name, name))
        if key not in self._groups:
            raise KeyError(f"unknown parallel axis {name!r}; known: data, pipe, tensor, expert, expert_data, model_parallel")
        return self._groups[key]

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
