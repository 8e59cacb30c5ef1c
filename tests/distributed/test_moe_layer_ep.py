"""Expert parallelism over real gloo processes equals the single-process layer, rank by rank.

Every rank builds, from one seed, a reference `MoE(ep_size=1)` holding all experts, and an
expert-parallel layer whose local experts are copied from the reference by global id
(`ep_rank * num_local_experts + i`). Each rank feeds its own tokens, a different number per rank,
through both with the same random state. Then on each rank: output, l_aux and exp_counts equal the
reference's; the input and gate gradients equal the reference's; and each local expert's gradient
equals the reference gradients of that expert summed over the ranks of the expert-parallel group
(the tokens it served came from all of them).

"empty" scenarios make the experts of the last expert-parallel rank unreachable, so that rank
receives no rows at all and its experts run on empty chunks: their gradients must be zeros, not
missing. Catches wrong split sizes or a misordered regroup (outputs differ), a missing or
one-directional backward exchange (gradients differ or hang), per-rank capacities that do not
tolerate different token counts (DeepSpeed aborts there), and ranks out of step on random draws.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from shardspeed.comm.groups import groups_for
from shardspeed.moe.layer import MoE
from tests.harness import ScenarioRuns, run_named

DEADLINE = 90.0
H, E = 8, 4
# fp32, the same math summed in another order (other batches, sums over ranks): a few ulp of the
# largest value, hence a tolerance relative to it.
TOL = 5e-6


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(H, 2 * H), nn.Linear(2 * H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _ep_group(ep: int) -> Any:
    """DeepSpeed's default layout: expert-parallel peers are consecutive ranks."""
    world = dist.get_world_size()
    lists = [list(range(i, i + ep)) for i in range(0, world, ep)]
    made = groups_for(lists)
    return made[tuple(next(r for r in lists if dist.get_rank() in r))]


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference, relative to the largest magnitude of the reference `b`."""
    if not a.numel():
        return 0.0
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-12))


def _grad(layer: MoE) -> torch.Tensor:
    grad = layer.deepspeed_moe.gate.wg.weight.grad
    assert grad is not None
    return grad


def _scenario(ep: int, k: int, drop: bool, empty: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    group = _ep_group(ep)
    ep_rank, local = dist.get_rank(group), E // ep
    kw: dict[str, Any] = dict(num_experts=E, k=k, capacity_factor=0.75, drop_tokens=drop)
    torch.manual_seed(0)
    ref = MoE(H, Expert(), **kw)
    if empty:  # inputs are positive, so these experts' logits are far below every other expert's
        with torch.no_grad():
            ref.deepspeed_moe.gate.wg.weight[(ep - 1) * local:] = -5.0
    moe = MoE(H, Expert(), ep_size=ep, **kw)
    moe.deepspeed_moe._set_ep_group(group)
    moe.deepspeed_moe.gate.load_state_dict(ref.deepspeed_moe.gate.state_dict())
    ref_experts = ref.deepspeed_moe.experts.deepspeed_experts
    for i, mine in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        mine.load_state_dict(ref_experts[ep_rank * local + i].state_dict())

    gen = torch.Generator().manual_seed(100 + rank)
    S = 20 + 6 * rank
    x = (torch.rand(S, H, generator=gen) + 0.5) if empty else torch.randn(S, H, generator=gen)
    probe = torch.randn(S, H, generator=gen)

    def run(layer: MoE) -> tuple[Any, ...]:
        xi = x.clone().requires_grad_()
        torch.manual_seed(1000 + rank)  # RTS priorities / top-2 sampling: the same draw in both layers
        out, l_aux, counts = layer(xi)
        ((out * probe).sum() + l_aux).backward()
        return out.detach(), l_aux.detach(), counts, xi.grad

    out_r, aux_r, counts_r, xgrad_r = run(ref)
    out_e, aux_e, counts_e, xgrad_e = run(moe)
    torch.manual_seed(1000 + rank)
    routing = ref.deepspeed_moe.gate.route(x)

    # The tokens each expert served came from every rank of the group: sum the reference's gradients there.
    ref_grads = [[p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in e.parameters()]
                 for e in ref_experts]
    flat = torch.cat([g.reshape(-1) for grads in ref_grads for g in grads])
    dist.all_reduce(flat, group=group)
    summed: list[list[torch.Tensor]] = []
    offset = 0
    for grads in ref_grads:
        summed.append([])
        for g in grads:
            summed[-1].append(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    expert_diff, missing = 0.0, 0
    for i, mine in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
        for p, want in zip(mine.parameters(), summed[ep_rank * local + i]):
            if p.grad is None:
                missing += 1
            else:
                expert_diff = max(expert_diff, _maxdiff(p.grad, want))
    served = sum(int((routing.experts == ep_rank * local + i).sum()) for i in range(local))
    return {
        "out": _maxdiff(out_e, out_r), "l_aux": _maxdiff(aux_e, aux_r), "counts_equal": torch.equal(counts_e, counts_r),
        "input_grad": _maxdiff(xgrad_e, xgrad_r),
        "gate_grad": _maxdiff(_grad(moe), _grad(ref)),
        "expert_grad": expert_diff, "missing_grads": missing,
        "tokens": S, "dropped": int((routing.experts < 0).sum()), "served_locally": served,
        "out_norm": float(out_r.norm()),
    }


def _set_parallelism(ep: int) -> list[int]:
    """`set_deepspeed_parallelism` hands the layer its expert-parallel group (from `utils.groups`)."""
    moe = MoE(H, Expert(), num_experts=E, ep_size=ep)
    moe.set_deepspeed_parallelism()
    group = moe.deepspeed_moe.ep_group
    assert moe.deepspeed_moe.gate.ep_group is group
    moe(torch.randn(10 + dist.get_rank(), H))[0].sum().backward()
    return dist.get_process_group_ranks(group)


def _names(world: int) -> list[str]:
    eps = [2] if world == 2 else [4, 2]
    return [f"ep{ep}-k{k}-{'drop' if drop else 'dropless'}-{'empty' if empty else 'full'}"
            for ep in eps for k in (1, 2) for drop in (True, False) for empty in (False, True)] + \
        [f"set-ep{ep}" for ep in eps]


SCENARIOS: dict[str, Callable[[], Any]] = {}
for _name in set(_names(2)) | set(_names(4)):
    if _name.startswith("set-ep"):
        SCENARIOS[_name] = (lambda ep: lambda: _set_parallelism(ep))(int(_name[6:]))
    else:
        _ep, _k, _drop, _empty = _name.split("-")
        SCENARIOS[_name] = (lambda *a: lambda: _scenario(*a))(int(_ep[2:]), int(_k[1:]), _drop == "drop", _empty == "empty")


def _run(names: list[str]) -> dict[str, tuple[str, Any]]:
    torch.manual_seed(0)
    return run_named(SCENARIOS, names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "moe_ep", _run, lambda world, tmp: (_names(world),), DEADLINE)


CASES = [(w, n) for w in (2, 4) for n in _names(w) if not n.startswith("set-")]


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world,name", CASES, ids=[f"world{w}-{n}" for w, n in CASES])
def test_expert_parallel_equals_single_process_reference(runs: ScenarioRuns, world: int, name: str) -> None:
    results = runs(world, name)
    assert len({r["tokens"] for r in results}) == world, "ranks must feed different token counts"
    for rank, r in enumerate(results):
        where = f"rank {rank} of {world}, {name}"
        assert r["counts_equal"], f"{where}: exp_counts differ"
        for key in ("out", "l_aux", "input_grad", "gate_grad", "expert_grad"):
            assert r[key] <= TOL, f"{where}: {key} differs by {r[key]}"
        assert r["missing_grads"] == 0, f"{where}: local experts without gradients"
        assert r["out_norm"] > 0
    dropped = sum(r["dropped"] for r in results)
    assert (dropped > 0) == ("-drop-" in name), f"{name}: {dropped} routes dropped"
    if name.endswith("-empty"):
        ep = int(name.split("-")[0][2:])
        last = [r["served_locally"] for rank, r in enumerate(results) if rank % ep == ep - 1]
        assert last and all(n == 0 for n in last), "the last expert-parallel rank's experts must get no tokens"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)])
def test_set_deepspeed_parallelism_gives_the_layer_its_group(runs: ScenarioRuns, world: int, ep: int) -> None:
    for rank, ranks in enumerate(runs(world, f"set-ep{ep}")):
        assert ranks == list(range(rank - rank % ep, rank - rank % ep + ep)), f"rank {rank}: group {ranks}"
