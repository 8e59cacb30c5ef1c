"""torch.distributed process groups, created once per process and handed out again on later requests.

Creating a group is collective (every rank calls `dist.new_group` for every group, in the same order)
and each one holds a communicator, so building them per engine leaks: RLHF and the Hugging Face
Trainer build several engines in one process. `groups_for` creates each distinct rank list once and
returns the same group object afterwards. The cache belongs to the current default process group:
after `destroy_process_group` and a new `init_process_group` it starts empty again.

Every rank must ask for the same rank lists in the same order (as with `dist.new_group` itself);
since ranks then agree on what is cached, they agree on which groups they create.
"""
from __future__ import annotations

import atexit
import weakref
from collections.abc import Sequence

import torch.distributed as dist

# The only process-wide state here is process groups: torch.distributed's own kind of state.
_cache: dict[tuple[str, tuple[int, ...]], dist.ProcessGroup] = {}
_owner: list[weakref.ReferenceType] = []  # the default group the cache was filled under (weak: torch owns it)


def _current_cache() -> dict[tuple[str, tuple[int, ...]], dist.ProcessGroup]:
    world = dist.distributed_c10d._get_default_group()
    if not _owner or _owner[0]() is not world:
        _cache.clear()
        _owner[:] = [weakref.ref(world)]
    return _cache


@atexit.register
def _forget() -> None:
    # Groups must be freed while the interpreter still runs: one that lives into its teardown can
    # abort the process in gloo's destructor.
    _cache.clear()


def groups_for(rank_lists: Sequence[Sequence[int]], tag: str = "") -> dict[tuple[int, ...], dist.ProcessGroup]:
    """The group of every rank list (collective: call it with the same lists on every rank).

    The whole world is `dist.group.WORLD` (no new communicator). `tag` keeps groups over the same
    ranks apart where they must not share a communicator (a pipeline's two message directions).
    """
    cache = _current_cache()
    world = dist.get_world_size()
    out: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for ranks in rank_lists:
        key = tuple(int(r) for r in ranks)
        if len(key) == world and not tag:
            world_group = dist.group.WORLD
            assert world_group is not None  # get_world_size() above needs the world initialised
            out[key] = world_group
            continue
        if (tag, key) not in cache:
            cache[(tag, key)] = dist.new_group(list(key))
        out[key] = cache[(tag, key)]
    return out


def cached_group_count() -> int:
    """How many groups this process has created through `groups_for` (under the current world)."""
    return len(_current_cache())
