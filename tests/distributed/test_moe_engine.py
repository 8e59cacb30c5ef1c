"""Expert parallelism through `shardspeed.initialize`: ep_size > 1 trains exactly as ep_size 1 (every rank
holding every expert) at the same data-parallel size, at ZeRO 0-3, with and without clipping; uneven
token counts per rank; checkpoints reload at another expert-parallel and world size with optimizer
state; random token selection resumes bit-exactly; bad MoE set-ups fail at initialize with clear errors.

Every expert starts from different weights (set by global expert index), so a rank applying the
wrong expert, or gradients summed over the wrong ranks, shows up as a difference.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import shardspeed
from shardspeed.moe.layer import MoE
from shardspeed.zero.param_names import global_name
from tests.harness import run_distributed

HIDDEN, EXPERTS, STEPS = 16, 4, 3
CLIP = 0.05  # small enough that clipping is active


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.fc2 = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class MoENet(nn.Module):
    """Linear -> MoE -> Linear -> Linear, loss = mse + 0.01 * l_aux."""

    def __init__(self, ep_size: int, k: int = 2, drop_tokens: bool = True, use_rts: bool = False,
                 capacity_factor: float = 1.0) -> None:
        super().__init__()
        self.inp = nn.Linear(HIDDEN, HIDDEN)
        self.moe = MoE(HIDDEN, Expert(), num_experts=EXPERTS, ep_size=ep_size, k=k, capacity_factor=capacity_factor,
                       eval_capacity_factor=capacity_factor, min_capacity=0, drop_tokens=drop_tokens, use_rts=use_rts,
                       top2_2nd_expert_sampling=False)
        self.mid = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, l_aux, _ = self.moe(torch.tanh(self.inp(x)))
        pred = self.out(torch.tanh(self.mid(h))).squeeze(-1)
        return torch.nn.functional.mse_loss(pred.float(), y) + 0.01 * l_aux


def build(ep_size: int, ep_rank: int, **kw: Any) -> MoENet:
    """Every rank builds the same dense weights; expert g gets weights seeded by g (local ones only)."""
    torch.manual_seed(0)
    model = MoENet(ep_size, **kw)
    local = EXPERTS // ep_size
    with torch.no_grad():
        for i, expert in enumerate(model.moe.deepspeed_moe.experts.deepspeed_experts):
            g = torch.Generator().manual_seed(100 + ep_rank * local + i)
            for p in expert.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch(step: int, rank: int, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    n = tokens if tokens is not None else 6
    return torch.randn(2, n, HIDDEN, generator=g), torch.randn(2, n, generator=g)


def config(stage: int, clip: float = 0.0, gas: int = 1, mb: int = 1) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": mb, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
            "zero_optimization": {"stage": stage, "reduce_bucket_size": 500, "allgather_bucket_size": 500,
                                  "stage3_param_persistence_threshold": 0}}


def full_weights(engine: Any) -> dict[str, torch.Tensor]:
    """Every parameter under its checkpoint (global expert) name, from all ranks (collective)."""
    if engine.zero_optimization_stage() == 3:
        from shardspeed.zero import GatheredParameters

        params = list(engine.module.parameters())
        mine = {}
        for name, p in engine.module.named_parameters():
            with GatheredParameters([p]):
                mine[global_name(name, p)] = p.detach().clone().float()
    else:
        mine = {global_name(n, p): p.detach().clone().float() for n, p in engine.module.named_parameters()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    out: dict[str, torch.Tensor] = {}
    for part in everyone:
        out.update(part)
    return out


def _ep_rank(ep: int) -> int:
    return dist.get_rank() % ep  # DeepSpeed's default layout: expert peers are adjacent ranks


def _train(ep: int, stage: int, clip: float, tokens: list[int] | None = None, **kw: Any) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = build(ep, _ep_rank(ep), **kw)
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=config(stage, clip))
    losses = []
    for step in range(STEPS):
        x, y = batch(step, dist.get_rank(), tokens[dist.get_rank()] if tokens else None)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    weights = full_weights(engine)
    engine.destroy()
    return losses, weights


def _compare(ep: int, stage: int, tokens: list[int] | None = None, clips: tuple[float, ...] = (0.0, CLIP),
             **kw: Any) -> list[tuple[float, float, float]]:
    out = []
    for clip in clips:
        ref_losses, ref_weights = _train(1, stage, clip, tokens, **kw)
        losses, weights = _train(ep, stage, clip, tokens, **kw)
        assert sorted(ref_weights) == sorted(weights), "checkpoint names differ between ep sizes"
        loss_diff = max(abs(a - b) for a, b in zip(ref_losses, losses))
        weight_diff = max((ref_weights[k] - weights[k]).abs().max().item() for k in weights)
        moved = max((ref_weights[k] - build(1, 0, **kw).state_dict()[k].float()).abs().max().item()
                    for k in ref_weights if "deepspeed_experts" in k)
        out.append((loss_diff, weight_diff, moved))
    return out


def _check(results: list[Any]) -> None:
    for per_rank in results:
        for loss_diff, weight_diff, moved in per_rank:
            assert loss_diff < 1e-6, f"losses differ by {loss_diff}"
            assert weight_diff < 1e-5, f"weights differ by {weight_diff}"  # fp32, sums in another order
            assert moved > 1e-3, "experts did not train"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_ep2_equals_ep1_at_world_2(tmp_path: Path, stage: int) -> None:
    _check(run_distributed(_compare, 2, tmp_path, 2, stage, deadline=180))


@pytest.mark.parametrize("stage,ep", [(1, 2), (2, 4), (3, 2)])
def test_ep_equals_ep1_at_world_4(tmp_path: Path, stage: int, ep: int) -> None:
    _check(run_distributed(_compare, 4, tmp_path, ep, stage, deadline=240))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_uneven_tokens_and_dropless(tmp_path: Path, stage: int) -> None:
    """Ranks with 3 and 9 tokens per sequence (DeepSpeed aborts in gloo with drop_tokens=True), top-1 (so
    some expert gets no token on a rank), dropping on and off."""
    for drop in (True, False):
        _check(run_distributed(_compare, 2, tmp_path / str(drop), 2, stage, [3, 9], (CLIP,), k=1, drop_tokens=drop,
                               deadline=180))


# ---- checkpoints at another expert-parallel and world size -------------------------------------------
def _run_steps(engine: Any, steps: range, world: int, gas: int) -> list[float]:
    """Each step sees the batches ranks 0..1 of a 2-rank run see: spread over the ranks, or as micro steps."""
    losses = []
    for step in steps:
        step_losses = []
        for m in range(gas):
            source = dist.get_rank() if world == 2 else m
            x, y = batch(step, source)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            step_losses.append(loss.item())
        losses.extend(step_losses)
    return losses


def _save_then_continue(stage: int, ep: int, save_dir: str) -> list[float]:
    world = dist.get_world_size()
    model = build(ep, _ep_rank(ep), drop_tokens=False)
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(),
                                       config=config(stage, CLIP, gas=2 // world))
    _run_steps(engine, range(2), world, 2 // world)
    engine.save_checkpoint(save_dir, tag="mid")
    after = _run_steps(engine, range(2, 4), world, 2 // world)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, after)
    engine.destroy()
    return [loss for step in range(2) for part in gathered for loss in part[step * (2 // world):(step + 1) * (2 // world)]]


def _load_and_continue(stage: int, ep: int, save_dir: str) -> list[float]:
    world = dist.get_world_size()
    torch.manual_seed(123)  # different initial weights: everything must come from the checkpoint
    model = MoENet(ep, drop_tokens=False)
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(),
                                       config=config(stage, CLIP, gas=2 // world))
    path, _ = engine.load_checkpoint(save_dir, tag="mid")
    assert path is not None
    after = _run_steps(engine, range(2, 4), world, 2 // world)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, after)
    engine.destroy()
    return [loss for step in range(2) for part in gathered for loss in part[step * (2 // world):(step + 1) * (2 // world)]]


@pytest.mark.parametrize("stage,load_stage", [(0, 0), (2, 2), (3, 3), (2, 1)])
def test_checkpoint_ep2_world2_loads_at_ep1_world1(tmp_path: Path, stage: int, load_stage: int) -> None:
    """Saved by 2 ranks with experts split 2 ways, loaded by 1 rank holding all experts (two micro
    steps per step stand for the two ranks): the next losses equal the uninterrupted run's."""
    uninterrupted = run_distributed(_save_then_continue, 2, tmp_path / "run", stage, 2, str(tmp_path / "ckpt"))[0]
    resumed = run_distributed(_load_and_continue, 1, tmp_path / "load", load_stage, 1, str(tmp_path / "ckpt"))[0]
    assert len(resumed) == len(uninterrupted) == 4
    assert max(abs(a - b) for a, b in zip(uninterrupted, resumed)) < 1e-6, (uninterrupted, resumed)


def test_checkpoint_ep1_world1_loads_at_ep2_world2(tmp_path: Path) -> None:
    uninterrupted = run_distributed(_save_then_continue, 1, tmp_path / "run", 2, 1, str(tmp_path / "ckpt"))[0]
    resumed = run_distributed(_load_and_continue, 2, tmp_path / "load", 2, 2, str(tmp_path / "ckpt"))[0]
    assert max(abs(a - b) for a, b in zip(uninterrupted, resumed)) < 1e-6, (uninterrupted, resumed)


def _rts_resume(save_dir: str, resume: bool) -> list[float]:
    model = build(2, _ep_rank(2), k=1, use_rts=True)
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=config(2, CLIP))
    if resume:
        engine.load_checkpoint(save_dir)
    losses = []
    for step in range(2 if resume else 0, 4):
        x, y = batch(step, dist.get_rank())
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if step == 1 and not resume:
            engine.save_checkpoint(save_dir)
    engine.destroy()
    return losses[-2:]


def test_random_token_selection_resumes_bit_exactly(tmp_path: Path) -> None:
    straight = run_distributed(_rts_resume, 2, tmp_path / "a", str(tmp_path / "ckpt"), False)
    resumed = run_distributed(_rts_resume, 2, tmp_path / "b", str(tmp_path / "ckpt"), True)
    assert straight == resumed


# ---- optimizer state partitioned over the expert-data-parallel group -----------------------------------
def _expert_state_bytes(stage: int, ep: int) -> dict[str, int]:
    model = build(ep, _ep_rank(ep))
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=config(stage))
    x, y = batch(0, dist.get_rank())
    engine.backward(engine(x, y))
    engine.step()
    groups = engine.optimizer.param_groups
    names = [g.get("name") for g in groups]
    breakdown = engine.memory_breakdown() if hasattr(engine, "memory_breakdown") else {}
    states = {}
    for group in groups:
        total = 0
        for p in group["params"]:
            total += sum(v.numel() * v.element_size() for v in engine.optimizer.state.get(p, {}).values()
                         if torch.is_tensor(v) and v.dim() > 0)
        states[str(group.get("name"))] = total
    engine.destroy()
    return {"names": names, "states": states, "breakdown": breakdown}


def test_expert_optimizer_states_partitioned_over_expert_data_group(tmp_path: Path) -> None:
    """World 4, ep 2, ZeRO-2: each rank holds 2 of 4 experts, replicated on 2 ranks, so its expert Adam
    state is 2 experts x 2 states x fp32 / 2 ranks (plus alignment padding)."""
    results = run_distributed(_expert_state_bytes, 4, tmp_path, 2, 2, deadline=120)
    expert_numel = sum(p.numel() for p in Expert().parameters())
    for r in results:
        assert r["names"][-1] == "ep_size_2" and "dense" in str(r["names"][0])
        formula = 2 * expert_numel * 2 * 4 / 2
        assert abs(r["states"]["ep_size_2"] - formula) <= 0.05 * formula, (r["states"], formula)


# ---- bad set-ups -------------------------------------------------------------------------------------
class GuideBlock(nn.Module):
    """The guide's §9.1 block, its MoE(...) call as written (attention replaced by a linear layer)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 2) -> None:
        super().__init__()
        self.attention = nn.Linear(hidden_size, hidden_size)
        self.moe_layer = MoE(hidden_size=hidden_size, expert=Expert(), num_experts=num_experts, ep_size=1, k=top_k,
                             capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4, use_residual=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        x, _, _ = self.moe_layer(x)
        return torch.nn.functional.mse_loss(x.sum(-1), y)


def _bad(case: str) -> str:
    model: nn.Module = build(2, _ep_rank(2))
    cfg = config(2)
    params: Any = model.parameters()
    optimizer = None
    if case == "guide_keys_disagree":
        cfg.update({"moe_expert_parallel_size": 4, "moe": {"enabled": True, "ep_size": 4, "moe_param_group": True}})
    elif case == "guide_groups":
        dense = {"params": [], "name": "parameters"}
        moe = {"params": [], "moe": True, "name": "moe_parameters"}
        for _, module in model.named_modules():
            if isinstance(module, MoE):
                moe["params"].extend(p for n, p in module.named_parameters() if "expert" in n)
            else:
                dense["params"].extend(module.parameters(recurse=False))
        params = [dense, moe]
    elif case == "client_optimizer_without_moe_group":
        cfg.pop("optimizer")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif case == "dense_in_moe_group":
        cfg.pop("optimizer")
        optimizer = torch.optim.AdamW([{"params": [model.inp.weight, *model.moe.deepspeed_moe.experts.parameters()],
                                        "moe": True, "name": "ep_size_2"},
                                       {"params": [p for n, p in model.named_parameters()
                                                   if "deepspeed_experts" not in n and n != "inp.weight"]}], lr=1e-3)
    elif case == "ep_does_not_divide_world":
        torch.manual_seed(0)
        model = MoENet(ep_size=4)
    elif case == "guide_block_and_agreeing_keys":
        torch.manual_seed(0)
        model = GuideBlock(HIDDEN, EXPERTS)
        params = model.parameters()
        cfg.update({"moe_expert_parallel_size": 1, "moe": {"enabled": True, "ep_size": 1, "moe_param_group": True}})
    try:
        engine, *_ = shardspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=cfg)
    except Exception as error:  # the message is what the test checks
        return f"{type(error).__name__}: {error}"
    losses = []
    for step in range(3):
        x, y = batch(step, 0)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return f"no error, losses {losses}, groups {[g.get('name') for g in engine.optimizer.param_groups]}"


@pytest.mark.parametrize("case,expected", [
    ("guide_keys_disagree", "`moe_expert_parallel_size` is 4 but the model's MoE layers have ep_size 2"),
    ("guide_groups", "split_params_into_different_moe_groups_for_optimizer"),
    ("client_optimizer_without_moe_group", "None of the param groups are marked as MoE"),
    ("dense_in_moe_group", "holds the dense parameter `inp.weight`"),
    ("ep_does_not_divide_world", "ep_size 4, which does not divide the data-parallel size 2"),
    ("guide_block_and_agreeing_keys", "no error, losses"),
])
def test_bad_moe_setups_name_the_problem(tmp_path: Path, case: str, expected: str) -> None:
    for message in run_distributed(_bad, 2, tmp_path, case, deadline=60):
        assert expected in message, message
        if case == "guide_block_and_agreeing_keys":
            assert "'ep_size_1'" in message, message  # the automatic expert group
