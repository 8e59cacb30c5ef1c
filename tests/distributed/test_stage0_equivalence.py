"""ZeRO stages 0, 1 and 2 equal single-process training on the full batch, and torch DDP, step for step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import shardspeed
from tests.harness import run_distributed
from tests.models import TinyNet, make_batches, rank_slice

STEPS, MICRO = 4, 2
CLIP = 0.5  # small enough that clipping is active on these random batches


def _config(gas: int, bucket: int, stage: int = 0, overlap: bool = True) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": CLIP,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": bucket, "allgather_bucket_size": 3 * bucket,
                              "overlap_comm": overlap},
    }


def _param_groups(model: torch.nn.Module) -> list[dict]:
    # Two groups with different lr / weight decay, as users write them.
    return [{"params": [model.fc1.weight, model.fc2.weight, model.head.weight]},
            {"params": [model.fc1.bias, model.fc2.bias, model.head.bias], "lr": 5e-3, "weight_decay": 0.0}]


def _train(gas: int, bucket: int, unused: bool, stage: int = 0, frozen: bool = False, overlap: bool = True,
           reduce_scatter: bool = False) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyNet(unused=unused, frozen=frozen)
    reference = copy.deepcopy(model)
    ddp_model = DDP(copy.deepcopy(model), find_unused_parameters=unused)
    batches = make_batches(STEPS, MICRO * gas * world)

    engine, _, _, _ = shardspeed.initialize(model=model, model_parameters=_param_groups(model),
                                            config=_config(gas, bucket, stage, overlap))
    if reduce_scatter:
        from shardspeed.comm.collectives import CommPolicy

        engine.strategy.reducer.policy = CommPolicy.native()  # NCCL's reduce-scatter, exercised on gloo
    ref_opt = torch.optim.AdamW(_param_groups(reference), lr=1e-2, weight_decay=0.1)
    ddp_opt = torch.optim.AdamW(_param_groups(ddp_model.module), lr=1e-2, weight_decay=0.1)

    engine_losses, ref_losses, ddp_losses = [], [], []
    for batch in batches:
        step_loss = 0.0
        for m in range(gas):
            x, y = rank_slice(batch, rank, world, MICRO, gas, m)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / gas
            # DDP: communicate only on the last micro step.
            ctx = ddp_model.no_sync() if m < gas - 1 else torch.enable_grad()
            with ctx:
                (ddp_model(x, y) / gas).backward()
        engine_losses.append(step_loss)
        torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), CLIP)
        ddp_opt.step()
        ddp_opt.zero_grad()
        # Reference: one process, the whole global batch at once.
        ref_opt.zero_grad()
        loss = reference(*batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), CLIP)
        ref_opt.step()
        ref_losses.append(loss.item())
    mean_losses = torch.tensor(engine_losses)
    dist.all_reduce(mean_losses)
    return {
        "engine_losses": (mean_losses / world).tolist(),
        "ref_losses": ref_losses,
        "engine": {k: v.detach().clone() for k, v in engine.module.state_dict().items()},
        "ref": {k: v.detach().clone() for k, v in reference.state_dict().items()},
        "ddp": {k: v.detach().clone() for k, v in ddp_model.module.state_dict().items()},
        "global_steps": engine.global_steps,
        "micro_steps": engine.micro_steps,
        "memory": engine.memory_breakdown(),
    }


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,gas,bucket,unused", [
    (1, 1, 10_000, False),
    (1, 4, 10_000, False),  # 4 accumulated micro steps == one step on the 4x batch
    (2, 1, 500, False),     # several buckets
    (2, 4, 10_000, True),   # accumulation, a parameter with no gradient
    (4, 2, 700, False),
])
def test_stage0_matches_single_process_and_ddp(tmp_path, world, gas, bucket, unused):
    """Catches wrong averaging, accumulation scaling, clipping, bucket boundaries or skipped reductions."""
    _check(run_distributed(_train, world, tmp_path, gas, bucket, unused), gas)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage,world,gas,bucket,unused,frozen,overlap,rs", [
    (1, 2, 1, 500, False, False, True, False),
    (1, 4, 2, 700, True, True, True, False),
    (1, 2, 2, 300, False, False, True, True),     # reduce-scatter path
    (2, 2, 4, 10_000, True, False, True, False),  # accumulation keeps only the partition
    (2, 4, 2, 700, False, True, True, False),
    (2, 2, 2, 300, True, False, False, True),     # no overlap, reduce-scatter path
    (2, 1, 2, 500, False, False, True, False),
])
def test_zero_stages_1_2_match_single_process_and_ddp(tmp_path, stage, world, gas, bucket, unused, frozen, overlap, rs):
    """Catches partitions updated wrongly, gradients reduced to the wrong owner, or a bad all-gather."""
    _check(run_distributed(_train, world, tmp_path, gas, bucket, unused, stage, frozen, overlap, rs), gas)


def _check(results: list[dict], gas: int) -> None:
    for r in results:
        assert r["global_steps"] == STEPS and r["micro_steps"] == STEPS * gas
        # fp32 sums in a different order (per-rank then all-reduce): agreement to ~1e-6 relative.
        torch.testing.assert_close(torch.tensor(r["engine_losses"]), torch.tensor(r["ref_losses"]), rtol=1e-5, atol=1e-6)
        for name, value in r["ref"].items():
            torch.testing.assert_close(r["engine"][name], value, rtol=1e-5, atol=1e-6, msg=f"{name} vs single process")
            torch.testing.assert_close(r["engine"][name], r["ddp"][name], rtol=1e-5, atol=1e-6, msg=f"{name} vs DDP")
    # Replicated parameters are bitwise equal on every rank.
    for r in results[1:]:
        for name, value in results[0]["engine"].items():
            assert torch.equal(r["engine"][name], value), name
