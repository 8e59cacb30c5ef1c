"""DeepSpeed's `deepspeed.utils.groups`: the expert-parallel process groups, looked up by name.

DeepSpeed names an expert layout `"ep_size_<n>"` (an `MoE` layer's `expert_group_name`). The groups
live in `shardspeed.comm.expert_groups` (made from the engine's topology); these are DeepSpeed's
accessors over them, with its names and signatures.
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..comm import expert_groups
from ..config.unbuilt import unbuilt_function


def _create_expert_and_data_parallel(expert_parallel_size_: int, mp_size: int | None = None, pp_size: int | None = None,
                                     mp_mode: str = "tp", use_data_before_expert_parallel_: bool = False) -> None:
    """DeepSpeed's group builder: expert groups over the data axis of a pipe x data x tensor layout of the
    whole job. An engine registers its own topology's groups first, so an `MoE` layer inside
    `initialize` finds those."""
    if mp_mode != "tp":
        raise NotImplementedError(f"expert groups with mp_mode={mp_mode!r} are not supported yet by shardspeed (only \"tp\")")
    expert_groups.create(expert_parallel_size_, mp_size or 1, pp_size or 1, use_data_before_expert_parallel_)


def _get_expert_parallel_group(group_name: str) -> Any:
    return expert_groups.expert_parallel(group_name).group


def _get_expert_data_parallel_group(group_name: str) -> Any:
    return expert_groups.expert_data_parallel(group_name).group


def _get_expert_parallel_group_dict() -> dict[str, Any]:
    return {name: expert_groups.expert_parallel(name).group for name in expert_groups.names()}


def _get_expert_data_parallel_group_dict() -> dict[str, Any]:
    return {name: expert_groups.expert_data_parallel(name).group for name in expert_groups.names()}


def _get_expert_parallel_world_size(group_name: str) -> int:
    return expert_groups.expert_parallel(group_name).size


def _get_expert_parallel_rank(group_name: str) -> int:
    return expert_groups.expert_parallel(group_name).rank


def _get_expert_data_parallel_world_size(group_name: str) -> int:
    return expert_groups.expert_data_parallel(group_name).size


def _get_expert_data_parallel_rank(group_name: str) -> int:
    return expert_groups.expert_data_parallel(group_name).rank


def _get_expert_parallel_ranks(group_name: str) -> list[int]:
    return list(expert_groups.expert_parallel(group_name).ranks)


def _get_expert_data_parallel_ranks(group_name: str) -> list[int]:
    return list(expert_groups.expert_data_parallel(group_name).ranks)


def _get_expert_broadcast_src_rank(group_name: str) -> int:
    """The global rank expert weights are broadcast from: the first of the expert-data-parallel group."""
    return expert_groups.expert_data_parallel(group_name).ranks[0]


def _get_max_expert_size() -> int:
    return max((int(name.rsplit("_", 1)[1]) for name in expert_groups.names()), default=1)


def _get_max_expert_size_name() -> str:
    return expert_groups.group_name(_get_max_expert_size())


def _get_data_parallel_group() -> Any:
    axis = expert_groups.data_parallel()
    return axis.group if axis is not None else dist.group.WORLD


def _get_data_parallel_world_size() -> int:
    axis = expert_groups.data_parallel()
    return axis.size if axis is not None else dist.get_world_size()


def _get_data_parallel_rank() -> int:
    axis = expert_groups.data_parallel()
    return axis.rank if axis is not None else dist.get_rank()


def _get_expert_model_parallel_world_size() -> int:
    return 1  # expert tensor parallelism is not built: experts are never split across tensor ranks


def _get_model_parallel_world_size() -> int:
    return dist.get_world_size() // _get_data_parallel_world_size()


def initialize(ep_size: int = 1, mpu: Any = None) -> None:
    raise DeprecationWarning("groups.initialize() is deprecated (as in DeepSpeed): pass ep_size to the MoE layer "
                             "and call shardspeed.initialize")


_SEQUENCE = "sequence parallelism"
_get_sequence_parallel_group = unbuilt_function(_SEQUENCE, "deepspeed.utils.groups._get_sequence_parallel_group")
_get_sequence_parallel_world_size = unbuilt_function(_SEQUENCE, "deepspeed.utils.groups._get_sequence_parallel_world_size")
