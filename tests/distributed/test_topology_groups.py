"""`Topology` at world size 4 on gloo: each rank's group on every axis, and what its all-reduce sums.

One spawn of 4 ranks builds several layouts in turn (group creation is collective, so every rank builds
them in the same order); each test then checks one layout. Every rank all-reduces 2**rank over each
axis group, so the sum names exactly the ranks that took part: it catches a group whose recorded
`ranks` are right but whose communicator was built from another list (or is the world by mistake).
Expected groups are written out by hand, not derived from ProcessTopology.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.harness import run_distributed

WORLD = 4
ALL = [[0, 1, 2, 3]]
SINGLE = [[0], [1], [2], [3]]

# name: (ProcessTopology axes, dims, ep_size) and the expected groups per axis (every rank in one group).
LAYOUTS: dict[str, tuple[list[str], list[int], int]] = {
    "pipe2_data2_ep2": (["pipe", "data"], [2, 2], 2),
    "pipe2_data2_ep1": (["pipe", "data"], [2, 2], 1),
    "data4_ep2": (["data"], [4], 2),
    "data4_ep4": (["data"], [4], 4),
    "pipe1_data2_model2_ep2": (["pipe", "data", "model"], [1, 2, 2], 2),  # PipeModelDataParallelTopology(1, 2, 2)
}
EXPECTED: dict[str, dict[str, list[list[int]]]] = {
    # rank = 2 * pipe + data: data peers adjacent; experts split the data axis in chunks of 2
    "pipe2_data2_ep2": {"data": [[0, 1], [2, 3]], "pipe": [[0, 2], [1, 3]], "tensor": SINGLE,
                        "expert": [[0, 1], [2, 3]], "expert_data": SINGLE},
    "pipe2_data2_ep1": {"data": [[0, 1], [2, 3]], "pipe": [[0, 2], [1, 3]], "tensor": SINGLE,
                        "expert": SINGLE, "expert_data": [[0, 1], [2, 3]]},
    # expert peers are adjacent data ranks; expert_data strides over them
    "data4_ep2": {"data": ALL, "pipe": SINGLE, "tensor": SINGLE, "expert": [[0, 1], [2, 3]],
                  "expert_data": [[0, 2], [1, 3]]},
    "data4_ep4": {"data": ALL, "pipe": SINGLE, "tensor": SINGLE, "expert": ALL, "expert_data": SINGLE},
    # rank = 2 * data + model: tensor peers adjacent
    "pipe1_data2_model2_ep2": {"data": [[0, 2], [1, 3]], "pipe": SINGLE, "tensor": [[0, 1], [2, 3]],
                               "expert": [[0, 2], [1, 3]], "expert_data": SINGLE},
}
DESCRIBE = {
    "pipe2_data2_ep2": "dp=2 pp=2 tp=1 ep=2",
    "pipe2_data2_ep1": "dp=2 pp=2 tp=1 ep=1",
    "data4_ep2": "dp=4 pp=1 tp=1 ep=2",
    "data4_ep4": "dp=4 pp=1 tp=1 ep=4",
    "pipe1_data2_model2_ep2": "dp=2 pp=1 tp=2 ep=2",
}
ALIASES = {"dp": "data", "pp": "pipe", "tp": "tensor", "model": "tensor", "ep": "expert"}


def _probe_layouts() -> dict[str, Any]:
    """On each rank: for every layout, each axis's (ranks, rank, size, all-reduce sum, is_world)."""
    import torch
    import torch.distributed as dist

    from shardspeed.comm.topology import ProcessTopology, Topology

    me = dist.get_rank()
    out: dict[str, Any] = {}
    for name, (axes, dims, ep) in LAYOUTS.items():
        topo = Topology(ProcessTopology(axes, dims), ep_size=ep)
        axes_out = {}
        for axis in EXPECTED[name]:
            g = topo.axis(axis)
            t = torch.tensor([float(2**me)], dtype=torch.float64)
            dist.all_reduce(t, group=g.group)
            axes_out[axis] = (list(g.ranks), g.rank, g.size, int(t.item()), g.group is dist.group.WORLD)
        aliases = {a: topo.axis(a) is topo.axis(b) for a, b in ALIASES.items()}
        out[name] = {"axes": axes_out, "aliases": aliases, "describe": topo.describe()}
    dp = Topology.data_parallel()
    out["data_parallel"] = (list(dp.axis("data").ranks), dp.axis("data").rank, list(dp.axis("expert_data").ranks))
    errors = {}
    for label, grid, ep in [("world_mismatch", ProcessTopology(["data"], [2]), 1),
                            ("ep_not_dividing", ProcessTopology(["data"], [4]), 3)]:
        try:
            Topology(grid, ep_size=ep)  # both raise before creating any group, on every rank alike
            errors[label] = None
        except ValueError as e:
            errors[label] = str(e)
    try:
        topo.axis("sequence")
        errors["unknown_axis"] = None
    except KeyError as e:
        errors["unknown_axis"] = str(e)
    out["errors"] = errors
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_distributed(_probe_layouts, WORLD, Path(tmp_path_factory.mktemp("topology_groups")))


def _mine(groups: list[list[int]], rank: int) -> list[int]:
    (group,) = [g for g in groups if rank in g]
    return group


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_axis_groups_and_all_reduce(results: list[dict[str, Any]], name: str) -> None:
    for rank, res in enumerate(results):
        for axis, groups in EXPECTED[name].items():
            ranks, idx, size, total, is_world = res[name]["axes"][axis]
            group = _mine(groups, rank)
            where = f"rank {rank} layout {name} axis {axis}"
            assert ranks == group, where
            assert idx == group.index(rank), where
            assert size == len(group), where
            assert total == sum(2**r for r in group), f"{where}: all-reduce summed the wrong ranks"
            assert is_world == (len(group) == WORLD), where


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_axis_aliases_and_describe(results: list[dict[str, Any]], name: str) -> None:
    for res in results:
        assert all(res[name]["aliases"].values()), res[name]["aliases"]
        assert res[name]["describe"] == DESCRIBE[name]


@pytest.mark.timeout(120)
def test_data_parallel_and_errors(results: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(results):
        assert res["data_parallel"] == ([0, 1, 2, 3], rank, [0, 1, 2, 3])
        errors = res["errors"]
        assert errors["world_mismatch"] is not None and "2 ranks" in errors["world_mismatch"]
        assert errors["ep_not_dividing"] is not None and "3" in errors["ep_not_dividing"]
        assert errors["unknown_axis"] is not None and "sequence" in errors["unknown_axis"]
