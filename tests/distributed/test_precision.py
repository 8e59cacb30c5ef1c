"""bf16 and fp16 under the engine: fp32 master weights, loss scaling, and overflow skipping on every rank."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import shardspeed
from tests.harness import run_distributed
from tests.models import TinyNet, make_batches, rank_slice

MICRO, STEPS = 4, 5


def _config(precision: dict, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": 1e-2, "warmup_num_steps": 3, "warmup_type": "linear"}},
        **precision,
        **extra,
    }


def _train(precision: dict, overflow_step: int | None = None, stage: int = 0) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyNet()
    engine, optimizer, _, scheduler = shardspeed.initialize(
        model=model, config=_config(precision, zero_optimization={"stage": stage, "reduce_bucket_size": 400,
                                                                   "stage3_param_persistence_threshold": 40}))
    batches = make_batches(STEPS, MICRO * world)
    losses, lrs, snapshots = [], [], []
    for step, batch in enumerate(batches):
        x, y = rank_slice(batch, rank, world, MICRO, 1, 0)
        loss = engine(x.to(next(engine.module.parameters()).dtype), y)  # as in DeepSpeed, inputs match the model dtype
        if step == overflow_step and rank == world - 1:
            loss = loss * float("inf")  # only the last rank overflows; every rank must skip
        engine.backward(loss)
        before = _weights(engine, stage)
        engine.step()
        losses.append(loss.item())
        lrs.append(engine.get_lr()[0])
        snapshots.append(all(torch.equal(before[k], v) for k, v in _weights(engine, stage).items()))
    masters = [p for g in optimizer.param_groups for p in g["params"]] if stage == 0 else []
    return {
        "losses": losses, "lrs": lrs, "unchanged": snapshots, "skipped": engine.skipped_steps,
        "scale": engine.loss_scaler.loss_scale, "steps": engine.global_steps,
        "param_dtypes": {p.dtype for p in engine.module.parameters()},
        "master_dtypes": {p.dtype for p in masters},
        "params": {k: v.float() for k, v in _weights(engine, stage).items()},
        "masters_rounded_equal": all(torch.equal(p, m.to(p.dtype)) for p, m in zip(
            [p for p in engine.module.parameters()], masters)) if masters and masters[0].dtype != next(engine.module.parameters()).dtype else True,
        "applied": engine.was_step_applied(),
    }


def _weights(engine, stage: int) -> dict:
    """Whole weights on every rank (stage 3 gathers them)."""
    if stage == 3:
        return engine.strategy.consolidated_state_dict(on_all_ranks=True)
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


def _train_pair(precision: dict, stage: int) -> tuple[dict, dict]:
    """An fp32 run and a 16-bit run, one after the other in the same processes."""
    return _train({}, None, stage), _train(precision, None, stage)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("name,precision,dtype", [
    ("bf16", {"bf16": {"enabled": True}}, torch.bfloat16),
    ("fp16", {"fp16": {"enabled": True, "initial_scale_power": 8}}, torch.float16),
])
def test_16bit_training_tracks_fp32_with_fp32_masters(tmp_path, name, precision, dtype, stage):
    """Catches masters not kept in fp32, updates not copied back, or 16-bit training diverging."""
    pairs = run_distributed(_train_pair, 2, tmp_path, precision, stage)
    fp32, low = [p[0] for p in pairs], [p[1] for p in pairs]
    for r, ref in zip(low, fp32):
        assert r["param_dtypes"] == {dtype} and r["master_dtypes"] <= {torch.float32}
        assert r["masters_rounded_equal"], "model weights must be the masters rounded to 16 bits"
        assert r["skipped"] == 0 and r["steps"] == STEPS
        # 16-bit forward/backward of a tiny net: losses agree with fp32 to a few 1e-3 relative.
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"]), rtol=3e-2, atol=3e-2)
    for key, value in low[0]["params"].items():
        assert torch.equal(value, low[1]["params"][key]), f"{key} differs across ranks"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world,stage", [(2, 0), (4, 0), (2, 1), (4, 2), (2, 3), (4, 3)])
def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(tmp_path, world, stage):
    """Catches a rank stepping past an overflow, a scale that is not lowered, or an LR step on a skipped step."""
    precision = {"fp16": {"enabled": True, "initial_scale_power": 10, "hysteresis": 1}}
    results = run_distributed(_train, world, tmp_path, precision, 2, stage)
    for r in results:
        assert r["skipped"] == 1 and r["steps"] == STEPS
        assert r["unchanged"] == [False, False, True, False, False], "only step 2 may leave the weights alone"
        assert r["scale"] == 2.0**9, "one overflow with hysteresis 1 halves 2**10"
        # WarmupLR (linear over 3 steps) advanced 4 times, not 5: the skipped step did not move it.
        assert math.isclose(r["lrs"][-1], 1e-2) and math.isclose(r["lrs"][2], r["lrs"][1])
        assert r["applied"]
    for r in results[1:]:
        for key, value in results[0]["params"].items():
            assert torch.equal(value, r["params"][key])
