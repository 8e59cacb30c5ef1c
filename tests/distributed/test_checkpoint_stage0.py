"""Stage-0 checkpoints: bit-exact resume, DeepSpeed's tag/latest semantics, and damage that is named."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import shardspeed
from shardspeed.runtime import model_checkpoint
from shardspeed.runtime.checkpoint_io import CheckpointError
from tests.harness import run_distributed
from tests.models import TinyNet, make_batches, rank_slice

MICRO = 2
CONFIG = {
    "train_micro_batch_size_per_gpu": MICRO,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 20, "warmup_num_steps": 4, "warmup_max_lr": 1e-2}},
}


def _engine(seed: int):
    torch.manual_seed(seed)
    engine, *_ = shardspeed.initialize(model=TinyNet(), config=CONFIG)
    return engine


def _steps(engine, batches, noise: bool = True) -> list[float]:
    """Train on `batches`; the torch RNG (restored by a resume) perturbs the inputs."""
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for batch in batches:
        for m in range(2):
            x, y = rank_slice(batch, rank, world, MICRO, 2, m)
            if noise:
                x = x + 0.1 * torch.randn_like(x)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def _resume(ckpt: str) -> dict:
    world = dist.get_world_size()
    batches = make_batches(6, MICRO * 2 * world)
    engine = _engine(0)
    _steps(engine, batches[:3])
    engine.save_checkpoint(ckpt, client_state={"epoch": 7})
    continued = _steps(engine, batches[3:])
    final = {k: v.clone() for k, v in engine.module.state_dict().items()}

    fresh = _engine(123)  # different initial weights: everything must come from the checkpoint
    path, client = fresh.load_checkpoint(ckpt)
    resumed = _steps(fresh, batches[3:])
    return {
        "path": path, "client": client, "continued": continued, "resumed": resumed,
        "final": final, "resumed_final": {k: v.clone() for k, v in fresh.module.state_dict().items()},
        "steps": (fresh.global_steps, fresh.global_samples, fresh.micro_steps), "lr": (engine.get_lr(), fresh.get_lr()),
        "latest": Path(ckpt, "latest").read_text(),
    }


@pytest.mark.timeout(180)
def test_resume_is_bit_exact_with_tag_latest_and_client_state(tmp_path):
    """Catches missing optimizer / LR / RNG / counter state, or a wrong default tag, in a resume."""
    ckpt = str(tmp_path / "ckpt")
    for r in run_distributed(_resume, 2, tmp_path / "run", ckpt):
        assert r["latest"] == "global_step3" and r["path"].endswith("global_step3")
        assert r["client"] == {"epoch": 7}
        assert r["resumed"] == r["continued"], "fp32 resume must reproduce the losses bit for bit"
        for k, v in r["final"].items():
            assert torch.equal(v, r["resumed_final"][k]), k
        assert r["steps"] == (6, 6 * MICRO * 2 * 2, 12)
        assert r["lr"][0] == r["lr"][1]


def _save_twice_then_crash(ckpt: str) -> str:
    engine = _engine(0)
    batches = make_batches(2, MICRO * 2 * dist.get_world_size())
    _steps(engine, batches[:1], noise=False)
    engine.save_checkpoint(ckpt)
    _steps(engine, batches[1:], noise=False)
    real_save = model_checkpoint.save_torch

    def dying_save(obj, path):
        if dist.get_rank() == 1:
            os._exit(9)  # as if killed mid-save, after rank 0 may have started writing
        return real_save(obj, path)

    model_checkpoint.save_torch = dying_save
    engine.save_checkpoint(ckpt)
    return "unreachable"


def _load_latest(ckpt: str) -> tuple[str, int]:
    engine = _engine(5)
    path, _ = engine.load_checkpoint(ckpt)
    return path, engine.global_steps


@pytest.mark.timeout(180)
def test_a_rank_dying_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    """Catches a save that updates `latest` or replaces files before every rank has finished writing."""
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(AssertionError, match="rank 1"):
        run_distributed(_save_twice_then_crash, 2, tmp_path / "crash", ckpt, deadline=90)
    assert Path(ckpt, "latest").read_text() == "global_step1"
    for path, steps in run_distributed(_load_latest, 2, tmp_path / "load", ckpt):
        assert path.endswith("global_step1") and steps == 1


def _save_only(ckpt: str) -> None:
    engine = _engine(0)
    _steps(engine, make_batches(1, MICRO * 2 * dist.get_world_size()), noise=False)
    engine.save_checkpoint(ckpt, tag="good")


def _load_expecting_error(ckpt: str) -> str:
    engine = _engine(1)
    try:
        engine.load_checkpoint(ckpt, tag="good")
    except CheckpointError as err:
        return str(err)
    return "no error"


def _load_each_expecting_error(folders: list[str]) -> list[str]:
    return [_load_expecting_error(folder) for folder in folders]


@pytest.mark.timeout(180)
def test_damaged_files_are_named(tmp_path):
    """Catches a corrupt, truncated or missing checkpoint file loading silently."""
    ckpt = tmp_path / "ckpt"
    run_distributed(_save_only, 2, tmp_path / "save", str(ckpt))
    damages = ["flip", "truncate", "delete"]
    victims = []
    for damage in damages:
        copy = tmp_path / damage
        shutil.copytree(ckpt, copy)
        victim = copy / "good" / "rank_1_states.pt"
        data = victim.read_bytes()
        if damage == "flip":
            victim.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
        elif damage == "truncate":
            victim.write_bytes(data[: len(data) // 2])
        else:
            victim.unlink()
        victims.append(victim)
    per_rank = run_distributed(_load_each_expecting_error, 2, tmp_path / "load", [str(tmp_path / d) for d in damages])
    for damage, victim, message in zip(damages, victims, per_rank[1]):
        assert str(victim) in message, (damage, message)
        assert ("missing" if damage == "delete" else "corrupt") in message, (damage, message)


# ---- ZeRO stages: same-layout resume and any-layout loading -------------------------------------
GLOBAL = 16


def _zero_engine(seed: int, stage: int):
    torch.manual_seed(seed)
    cfg = {**CONFIG, "train_batch_size": GLOBAL, "gradient_accumulation_steps": 2,
           "zero_optimization": {"stage": stage, "reduce_bucket_size": 300, "allgather_bucket_size": 500}}
    cfg.pop("train_micro_batch_size_per_gpu")
    engine, *_ = shardspeed.initialize(model=TinyNet(), config=cfg)
    return engine


def _global_losses(engine, batches) -> list[float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = GLOBAL // (2 * world)
    out = []
    for batch in batches:
        total = torch.zeros(())
        for m in range(2):
            x, y = rank_slice(batch, rank, world, micro, 2, m)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        out.append(total.item() / (2 * world))
    return out


def _save_then_continue(ckpt: str, stage: int) -> list[float]:
    batches = make_batches(5, GLOBAL)
    engine = _zero_engine(0, stage)
    _global_losses(engine, batches[:2])
    engine.save_checkpoint(ckpt)
    return _global_losses(engine, batches[2:])


def _load_then_continue(ckpt: str, stage: int, resave: str | None) -> list[float]:
    engine = _zero_engine(99, stage)
    engine.load_checkpoint(ckpt)
    if resave:
        engine.save_checkpoint(resave)
    return _global_losses(engine, make_batches(5, GLOBAL)[2:])


@pytest.mark.timeout(240)
def test_any_layout_loads_with_the_same_next_losses(tmp_path):
    """world 4 stage 2 -> world 2 stage 1 -> world 1 stage 0: catches optimizer state or weights
    mis-assembled when the partitioning changes."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    original = run_distributed(_save_then_continue, 4, tmp_path / "w4", a, 2)[0]
    via_stage1 = run_distributed(_load_then_continue, 2, tmp_path / "w2", a, 1, b)[0]
    via_stage0 = run_distributed(_load_then_continue, 1, tmp_path / "w1", b, 0, None)[0]
    # Same weights and states; only the order of fp32 sums differs between layouts.
    torch.testing.assert_close(torch.tensor(via_stage1), torch.tensor(original), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(via_stage0), torch.tensor(original), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_resume_at_the_same_layout_is_bit_exact(tmp_path, stage):
    """Catches partition state that is saved or restored inexactly."""
    ckpt = str(tmp_path / "ckpt")
    original = run_distributed(_save_then_continue, 2, tmp_path / "save", ckpt, stage)[0]
    resumed = run_distributed(_load_then_continue, 2, tmp_path / "load", ckpt, stage, None)[0]
    assert resumed == original
