"""The expert-parallel process groups of the job, by DeepSpeed's name for a layout (`"ep_size_<n>"`).

Each name has two groups: the expert-parallel group (the ranks that split one set of experts between
them, exchanging tokens with all-to-all) and the expert-data-parallel group (the ranks holding the
same experts, over which expert gradients are summed). Both come from `Topology.expert_axes`, so an
engine's groups and these are the same objects; this module only remembers them by name (DeepSpeed's
`deepspeed.utils.groups` accessors read them here). Like the groups themselves, the names are
forgotten when the default process group is replaced.
"""
from __future__ import annotations

import atexit
import weakref

import torch.distributed as dist

from .topology import Axis, AxisGroup, Topology

# Process groups are the one kind of process-wide state shardspeed keeps (STYLE: "beyond the process groups").
_expert_parallel: dict[str, AxisGroup] = {}
_expert_data_parallel: dict[str, AxisGroup] = {}
_data_parallel: list[AxisGroup] = []  # the data axis of the last topology that registered, if any
_owner: list[weakref.ReferenceType] = []


@atexit.register
def _forget() -> None:
    # As comm.groups: a process group that lives into the interpreter's teardown can abort the process
    # in gloo's destructor ("terminate called without an active exception").
    _expert_parallel.clear()
    _expert_data_parallel.clear()
    _data_parallel.clear()


def _fresh() -> None:
    """Forget names registered under an earlier default process group."""
    world = dist.distributed_c10d._get_default_group()
    if not _owner or _owner[0]() is not world:
        _expert_parallel.clear()
        _expert_data_parallel.clear()
        _data_parallel.clear()
        _owner[:] = [weakref.ref(world)]


def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"


def register(topology: Topology, ep_size: int, data_before_expert: bool = False) -> str:
    """Make (once) and name the expert groups of `topology` for `ep_size`; returns the name (collective)."""
    _fresh()
    name = group_name(ep_size)
    if name not in _expert_parallel:
        ep, edp = topology.expert_axes(ep_size, data_before_expert)
        _expert_parallel[name], _expert_data_parallel[name] = ep, edp
    _data_parallel[:] = [topology.axis(Axis.DATA)]
    return name


def create(ep_size: int, tensor: int = 1, pipe: int = 1, data_before_expert: bool = False) -> str:
    """The groups of `ep_size` over the data axis of a pipe x data x tensor layout of the whole job (tensor
    peers adjacent), unless that name is registered already (an engine registers its own topology's)."""
    _fresh()
    name = group_name(ep_size)
    if name in _expert_parallel:
        return name
    world = dist.get_world_size()
    if world % (tensor * pipe) or (world // (tensor * pipe)) % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} must divide the data-parallel size "
                         f"(world {world} / tensor {tensor} / pipeline {pipe})")
    return register(Topology.build(pipe=pipe, tensor=tensor), ep_size, data_before_expert)


def _lookup(table: dict[str, AxisGroup], name: str, what: str) -> AxisGroup:
    _fresh()
    if name not in table:
        known = ", ".join(sorted(table)) or "none yet"
        raise KeyError(f"no {what} group named {name!r} (known: {known}); it is made when an engine with MoE layers of "
                       "that ep_size is initialised, or by groups._create_expert_and_data_parallel(ep_size)")
    return table[name]


def expert_parallel(name: str) -> AxisGroup:
    return _lookup(_expert_parallel, name, "expert-parallel")


def expert_data_parallel(name: str) -> AxisGroup:
    return _lookup(_expert_data_parallel, name, "expert-data-parallel")


def names() -> list[str]:
    _fresh()
    return list(_expert_parallel)


def data_parallel() -> AxisGroup | None:
    _fresh()
    return _data_parallel[0] if _data_parallel else None
