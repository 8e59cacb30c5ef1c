"""DeepSpeed parity for the rank arithmetic of `ProcessTopology` and its pipe/model/data layouts.

DS_TOPOLOGIES below was produced by DeepSpeed 0.19.8 (`deepspeed.runtime.pipe.topology`, torch CPU,
DS_ACCELERATOR=cpu) and is pasted verbatim (re-wrapped; filter keys written as "axis=value,..."). The
tests never import deepspeed. To regenerate, run this in a venv with deepspeed==0.19.8:

    import itertools
    from deepspeed.runtime.pipe.topology import ProcessTopology, PipeDataParallelTopology, PipeModelDataParallelTopology
    LAYOUTS = {"pipe_data_2x2": PipeDataParallelTopology(num_pp=2, num_dp=2),
               "pipe_data_4x2": PipeDataParallelTopology(num_pp=4, num_dp=2),
               "pipe_model_data_2x2x2": PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2),
               "pipe_model_data_2x4x2": PipeModelDataParallelTopology(num_pp=2, num_mp=4, num_dp=2),
               "process_xyz_2x1x3": ProcessTopology(axes=["x", "y", "z"], dims=[2, 1, 3])}
    for name, t in LAYOUTS.items():
        axes = t.get_axis_names()
        print(name, list(axes), t.world_size(), {a: t.get_dim(a) for a in axes},
              [tuple(t.get_coord(r)) for r in range(t.world_size())],
              {a: t.get_axis_comm_lists(a) for a in axes},
              {f"{a}={i}": t.get_axis_list(a, i) for a in axes for i in range(t.get_dim(a))},
              {",".join(f"{a}={v}" for a, v in zip(combo, vals)): t.filter_match(**dict(zip(combo, vals)))
               for k in (1, 2) for combo in itertools.combinations(axes, k)
               for vals in itertools.product(*(range(t.get_dim(a)) for a in combo))})

Where we deliberately differ from DeepSpeed (tested as our contract below): an axis the topology
lacks has size 1 (DeepSpeed: `get_dim` 0) and one singleton comm list per rank (DeepSpeed: []),
so every rank lies on every axis and `Topology` can build a group for it; bad axes/dims raise
ValueError up front (DeepSpeed builds an empty topology for a 0 dim, IndexError for a length mismatch).
"""
from __future__ import annotations

import itertools
from typing import Callable

import pytest

from shardspeed.comm.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

DS_TOPOLOGIES = {
    "pipe_data_2x2": {
        "axes": ["pipe", "data"], "world_size": 4, "dims": {"pipe": 2, "data": 2},
        "coords": [(0, 0), (0, 1), (1, 0), (1, 1)],
        "comm_lists": {"pipe": [[0, 2], [1, 3]], "data": [[0, 1], [2, 3]]},
        "axis_lists": {"pipe=0": [0, 1], "pipe=1": [2, 3], "data=0": [0, 2], "data=1": [1, 3]},
        "filter_match": {
            "pipe=0": [0, 1], "pipe=1": [2, 3], "data=0": [0, 2], "data=1": [1, 3], "pipe=0,data=0": [0],
            "pipe=0,data=1": [1], "pipe=1,data=0": [2], "pipe=1,data=1": [3],
        },
    },
    "pipe_data_4x2": {
        "axes": ["pipe", "data"], "world_size": 8, "dims": {"pipe": 4, "data": 2},
        "coords": [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1)],
        "comm_lists": {"pipe": [[0, 2, 4, 6], [1, 3, 5, 7]], "data": [[0, 1], [2, 3], [4, 5], [6, 7]]},
        "axis_lists": {
            "pipe=0": [0, 1], "pipe=1": [2, 3], "pipe=2": [4, 5], "pipe=3": [6, 7], "data=0": [0, 2, 4, 6],
            "data=1": [1, 3, 5, 7],
        },
        "filter_match": {
            "pipe=0": [0, 1], "pipe=1": [2, 3], "pipe=2": [4, 5], "pipe=3": [6, 7], "data=0": [0, 2, 4, 6],
            "data=1": [1, 3, 5, 7], "pipe=0,data=0": [0], "pipe=0,data=1": [1], "pipe=1,data=0": [2],
            "pipe=1,data=1": [3], "pipe=2,data=0": [4], "pipe=2,data=1": [5], "pipe=3,data=0": [6],
            "pipe=3,data=1": [7],
        },
    },
    "pipe_model_data_2x2x2": {
        "axes": ["pipe", "data", "model"], "world_size": 8, "dims": {"pipe": 2, "data": 2, "model": 2},
        "coords": [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)],
        "comm_lists": {
            "pipe": [[0, 4], [1, 5], [2, 6], [3, 7]], "data": [[0, 2], [1, 3], [4, 6], [5, 7]],
            "model": [[0, 1], [2, 3], [4, 5], [6, 7]],
        },
        "axis_lists": {
            "pipe=0": [0, 1, 2, 3], "pipe=1": [4, 5, 6, 7], "data=0": [0, 1, 4, 5], "data=1": [2, 3, 6, 7],
            "model=0": [0, 2, 4, 6], "model=1": [1, 3, 5, 7],
        },
        "filter_match": {
            "pipe=0": [0, 1, 2, 3], "pipe=1": [4, 5, 6, 7], "data=0": [0, 1, 4, 5], "data=1": [2, 3, 6, 7],
            "model=0": [0, 2, 4, 6], "model=1": [1, 3, 5, 7], "pipe=0,data=0": [0, 1], "pipe=0,data=1": [2, 3],
            "pipe=1,data=0": [4, 5], "pipe=1,data=1": [6, 7], "pipe=0,model=0": [0, 2], "pipe=0,model=1": [1, 3],
            "pipe=1,model=0": [4, 6], "pipe=1,model=1": [5, 7], "data=0,model=0": [0, 4], "data=0,model=1": [1, 5],
            "data=1,model=0": [2, 6], "data=1,model=1": [3, 7],
        },
    },
    "pipe_model_data_2x4x2": {
        "axes": ["pipe", "data", "model"], "world_size": 16, "dims": {"pipe": 2, "data": 2, "model": 4},
        "coords": [
            (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 1, 3), (1, 0, 0),
            (1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 1, 0), (1, 1, 1), (1, 1, 2), (1, 1, 3),
        ],
        "comm_lists": {
            "pipe": [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]],
            "data": [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]],
            "model": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
        },
        "axis_lists": {
            "pipe=0": [0, 1, 2, 3, 4, 5, 6, 7], "pipe=1": [8, 9, 10, 11, 12, 13, 14, 15],
            "data=0": [0, 1, 2, 3, 8, 9, 10, 11], "data=1": [4, 5, 6, 7, 12, 13, 14, 15], "model=0": [0, 4, 8, 12],
            "model=1": [1, 5, 9, 13], "model=2": [2, 6, 10, 14], "model=3": [3, 7, 11, 15],
        },
        "filter_match": {
            "pipe=0": [0, 1, 2, 3, 4, 5, 6, 7], "pipe=1": [8, 9, 10, 11, 12, 13, 14, 15],
            "data=0": [0, 1, 2, 3, 8, 9, 10, 11], "data=1": [4, 5, 6, 7, 12, 13, 14, 15], "model=0": [0, 4, 8, 12],
            "model=1": [1, 5, 9, 13], "model=2": [2, 6, 10, 14], "model=3": [3, 7, 11, 15],
            "pipe=0,data=0": [0, 1, 2, 3], "pipe=0,data=1": [4, 5, 6, 7], "pipe=1,data=0": [8, 9, 10, 11],
            "pipe=1,data=1": [12, 13, 14, 15], "pipe=0,model=0": [0, 4], "pipe=0,model=1": [1, 5],
            "pipe=0,model=2": [2, 6], "pipe=0,model=3": [3, 7], "pipe=1,model=0": [8, 12],
            "pipe=1,model=1": [9, 13], "pipe=1,model=2": [10, 14], "pipe=1,model=3": [11, 15],
            "data=0,model=0": [0, 8], "data=0,model=1": [1, 9], "data=0,model=2": [2, 10],
            "data=0,model=3": [3, 11], "data=1,model=0": [4, 12], "data=1,model=1": [5, 13],
            "data=1,model=2": [6, 14], "data=1,model=3": [7, 15],
        },
    },
    "process_xyz_2x1x3": {
        "axes": ["x", "y", "z"], "world_size": 6, "dims": {"x": 2, "y": 1, "z": 3},
        "coords": [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 0), (1, 0, 1), (1, 0, 2)],
        "comm_lists": {
            "x": [[0, 3], [1, 4], [2, 5]], "y": [[0], [1], [2], [3], [4], [5]], "z": [[0, 1, 2], [3, 4, 5]],
        },
        "axis_lists": {
            "x=0": [0, 1, 2], "x=1": [3, 4, 5], "y=0": [0, 1, 2, 3, 4, 5], "z=0": [0, 3], "z=1": [1, 4],
            "z=2": [2, 5],
        },
        "filter_match": {
            "x=0": [0, 1, 2], "x=1": [3, 4, 5], "y=0": [0, 1, 2, 3, 4, 5], "z=0": [0, 3], "z=1": [1, 4],
            "z=2": [2, 5], "x=0,y=0": [0, 1, 2], "x=1,y=0": [3, 4, 5], "x=0,z=0": [0], "x=0,z=1": [1],
            "x=0,z=2": [2], "x=1,z=0": [3], "x=1,z=1": [4], "x=1,z=2": [5], "y=0,z=0": [0, 3], "y=0,z=1": [1, 4],
            "y=0,z=2": [2, 5],
        },
    },
}

LAYOUTS: dict[str, Callable[[], ProcessTopology]] = {
    "pipe_data_2x2": lambda: PipeDataParallelTopology(num_pp=2, num_dp=2),
    "pipe_data_4x2": lambda: PipeDataParallelTopology(num_pp=4, num_dp=2),
    "pipe_model_data_2x2x2": lambda: PipeModelDataParallelTopology(num_pp=2, num_mp=2, num_dp=2),
    "pipe_model_data_2x4x2": lambda: PipeModelDataParallelTopology(num_pp=2, num_mp=4, num_dp=2),
    "process_xyz_2x1x3": lambda: ProcessTopology(axes=["x", "y", "z"], dims=[2, 1, 3]),
}


def _coord_tuple(topo: ProcessTopology, rank: int) -> tuple[int, ...]:
    coord = topo.get_coord(rank)
    return tuple(getattr(coord, a) for a in topo.get_axis_names())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_shape_matches_deepspeed(name: str) -> None:
    """Catches a changed axis order (which axis varies fastest) or a wrong world size."""
    ds, topo = DS_TOPOLOGIES[name], LAYOUTS[name]()
    assert topo.get_axis_names() == ds["axes"]
    assert topo.world_size() == ds["world_size"]
    assert {a: topo.get_dim(a) for a in ds["axes"]} == ds["dims"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_coords_and_ranks_match_deepspeed(name: str) -> None:
    """get_coord gives DeepSpeed's coordinate for every rank, and get_rank inverts it."""
    ds, topo = DS_TOPOLOGIES[name], LAYOUTS[name]()
    assert [_coord_tuple(topo, r) for r in range(topo.world_size())] == ds["coords"]
    for rank, coord in enumerate(ds["coords"]):
        assert topo.get_rank(**dict(zip(ds["axes"], coord))) == rank


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_axis_comm_lists_match_deepspeed(name: str) -> None:
    """The communicator rank lists (and their order: groups are created in this order on every rank)."""
    ds, topo = DS_TOPOLOGIES[name], LAYOUTS[name]()
    assert {a: topo.get_axis_comm_lists(a) for a in ds["axes"]} == ds["comm_lists"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_axis_lists_match_deepspeed(name: str) -> None:
    ds, topo = DS_TOPOLOGIES[name], LAYOUTS[name]()
    got = {f"{a}={i}": topo.get_axis_list(a, i) for a in ds["axes"] for i in range(ds["dims"][a])}
    assert got == ds["axis_lists"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_filter_match_matches_deepspeed(name: str) -> None:
    ds, topo = DS_TOPOLOGIES[name], LAYOUTS[name]()
    got = {}
    for key in ds["filter_match"]:
        filters = {a: int(v) for a, v in (kv.split("=") for kv in key.split(","))}
        got[key] = topo.filter_match(**filters)
    assert got == ds["filter_match"]


def test_filter_match_all_axes_is_get_rank_and_empty_filter_is_everyone() -> None:
    topo = PipeModelDataParallelTopology(num_pp=2, num_mp=4, num_dp=2)
    for pipe, data, model in itertools.product(range(2), range(2), range(4)):
        assert topo.filter_match(pipe=pipe, data=data, model=model) == [topo.get_rank(pipe=pipe, data=data, model=model)]
    assert topo.filter_match() == list(range(16))


def test_pipe_model_data_argument_order() -> None:
    """DeepSpeed's constructor takes (num_pp, num_mp, num_dp) but lays the axes out pipe, data, model:
    catches a port that lays out the dims in argument order."""
    topo = PipeModelDataParallelTopology(2, 4, 1)
    assert topo.get_axis_names() == ["pipe", "data", "model"]
    assert (topo.get_dim("pipe"), topo.get_dim("data"), topo.get_dim("model")) == (2, 1, 4)


def test_missing_axis_is_size_one_with_singleton_lists() -> None:
    """Our contract (DeepSpeed returns get_dim 0 and [] here): Topology relies on it to give every rank
    a group on every axis."""
    topo = PipeDataParallelTopology(num_pp=2, num_dp=2)
    assert topo.get_dim("model") == 1
    assert topo.get_axis_comm_lists("model") == [[0], [1], [2], [3]]


@pytest.mark.parametrize(
    "axes,dims,match",
    [
        (["pipe", "data"], [2], "pair up"),
        (["pipe"], [2, 2], "pair up"),
        (["data", "data"], [2, 2], "distinct"),
        (["pipe", "data"], [2, 0], "positive"),
        (["pipe", "data"], [-1, 2], "positive"),
    ],
)
def test_bad_axes_or_dims_raise(axes: list[str], dims: list[int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProcessTopology(axes, dims)


def test_bad_layout_sizes_raise() -> None:
    with pytest.raises(ValueError):
        PipeDataParallelTopology(num_pp=0, num_dp=2)
    with pytest.raises(ValueError):
        PipeModelDataParallelTopology(num_pp=2, num_mp=0, num_dp=2)


@pytest.mark.parametrize("rank", [-1, 4, 100])
def test_get_coord_outside_the_world_raises(rank: int) -> None:
    """DeepSpeed raises ValueError ('rank 4 not found in topology.') too."""
    with pytest.raises(ValueError, match=str(rank)):
        PipeDataParallelTopology(num_pp=2, num_dp=2).get_coord(rank)


@pytest.mark.parametrize("coords", [dict(pipe=0), dict(pipe=0, data=0, model=0), dict(pipe=0, stage=1)])
def test_get_rank_needs_exactly_the_axes(coords: dict[str, int]) -> None:
    """DeepSpeed raises ValueError ('does not support slices. Use filter_match()') for a missing axis."""
    with pytest.raises(ValueError):
        PipeDataParallelTopology(num_pp=2, num_dp=2).get_rank(**coords)


@pytest.mark.parametrize("coords", [dict(pipe=5, data=0), dict(pipe=0, data=2), dict(pipe=1, data=-1)])
def test_get_rank_out_of_range_coordinate_raises(coords: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        PipeDataParallelTopology(num_pp=2, num_dp=2).get_rank(**coords)


def test_get_coord_supports_deepspeed_attribute_access() -> None:
    coord = PipeDataParallelTopology(num_pp=2, num_dp=2).get_coord(3)
    assert (coord.pipe, coord.data) == (1, 1)  # DeepSpeed: ProcessCoord(pipe=1, data=1)
