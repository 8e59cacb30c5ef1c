"""The engine's DeepSpeed-named surface: counters, boundaries, accessors, dataloader, monitors, errors."""
from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import shardspeed
from shardspeed.config import ConfigError
from tests.harness import run_distributed
from tests.models import IN, TinyNet


def _api(tmp: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, IN), torch.randint(0, 4, (40,)))
    cfg_path = f"{tmp}/ds_config.json"
    if rank == 0:
        with open(cfg_path, "w") as f:
            json.dump({
                "train_batch_size": 4 * world * 3, "gradient_accumulation_steps": 3, "steps_per_print": 1,
                "wall_clock_breakdown": True, "memory_breakdown": True,
                "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                "csv_monitor": {"enabled": True, "output_path": f"{tmp}/csv", "job_name": "job"},
            }, f)
    dist.barrier()
    parser = shardspeed.add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", cfg_path])
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("shardspeed").addHandler(handler)
    logging.getLogger("shardspeed").setLevel(logging.INFO)
    engine, optimizer, loader, sched = shardspeed.initialize(args=args, model=TinyNet(), training_data=data)
    boundaries, seen = [], []
    for x, y in loader:
        seen.extend(x[:, 0].tolist())
        boundaries.append(engine.is_gradient_accumulation_boundary())
        engine.backward(engine(x, y))
        engine.step()
    out = {
        "batch": (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()),
        "stage": engine.zero_optimization_stage(), "boundaries": boundaries, "seen": seen,
        "counters": (engine.global_steps, engine.micro_steps, engine.global_samples, engine.skipped_steps),
        "lr": engine.get_lr(), "grad_norm": engine.get_global_grad_norm(), "optimizer_is_sgd": isinstance(optimizer, torch.optim.SGD),
        "loader_len": len(loader), "sched": sched, "memory": engine.memory_breakdown(), "logs": records,
        "rank": (engine.global_rank, engine.local_rank, engine.world_size, engine.device.type),
    }
    engine.destroy()
    return out


@pytest.mark.timeout(180)
def test_engine_surface_at_world_two(tmp_path):
    """Catches wrong boundary arithmetic, counters, dataloader sharding, or silent monitors/logging."""
    results = run_distributed(_api, 2, tmp_path / "run", str(tmp_path))
    r0, r1 = results
    assert r0["batch"] == (24, 4, 3) and r0["stage"] == 0
    assert r0["loader_len"] == 5 and r0["boundaries"] == [False, False, True, False, False]
    assert r0["counters"] == (1, 5, 24, 0)
    assert r0["optimizer_is_sgd"] and r0["lr"] == [0.1] and r0["sched"] is None and r0["grad_norm"] > 0
    # The two ranks see disjoint halves of the dataset.
    assert not set(r0["seen"]) & set(r1["seen"]) and len(r0["seen"]) + len(r1["seen"]) == 40
    assert set(r0["memory"]) == {"parameters", "gradients", "master_weights", "optimizer_states"}
    assert r0["memory"]["parameters"] == r0["memory"]["gradients"] > 0 and r0["memory"]["master_weights"] == 0
    assert any("step=1" in line and "loss=" in line for line in r0["logs"])
    assert any("forward" in line and "backward" in line for line in r0["logs"]), "wall_clock_breakdown line missing"
    assert any("memory breakdown" in line for line in r0["logs"])
    assert r0["rank"] == (0, 0, 2, "cpu") and r1["rank"] == (1, 1, 2, "cpu")
    csv = (tmp_path / "csv" / "job" / "Train_Samples_train_loss.csv").read_text().splitlines()
    assert csv[0] == "step,train_loss" and csv[1].startswith("24,")


def _initialize_error(config: dict, **kwargs) -> str:
    try:
        shardspeed.initialize(model=TinyNet(), config=config, **kwargs)
    except (ConfigError, NotImplementedError) as err:
        return str(err)
    return "no error"


BASE = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


@pytest.mark.timeout(120)
def test_unsupported_and_conflicting_settings_fail_clearly(tmp_path):
    """Catches features that are switched on but silently ignored, or conflicting inputs accepted."""
    cases = {
        "`zero_optimization.offload_param` offloads stage-3": {
            **BASE, "zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
        "set `zero_optimization.offload_optimizer.device`": {
            **BASE, "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": str(tmp_path)}}},
        "`zero_optimization.offload_optimizer.nvme_path` must name": {
            **BASE, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}},
        "`zero_optimization.offload_optimizer` needs ZeRO stage 1, 2 or 3": {
            **BASE, "zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
        "`zero_optimization.offload_optimizer.ratio`": {
            **BASE, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}},
        "zero_optimization.offload_optimizer.nvme_path": {
            **BASE, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path / "a_file")}}},
        "tensor_parallel.tp_overlap_comm": {**BASE, "tensor_parallel": {"tp_overlap_comm": True}},
        "AutoTP supports Hugging Face model types gpt2, llama": {**BASE, "tensor_parallel": {"tp_size": 2}},
        "moe.enabled": {**BASE, "moe": {"enabled": True}},
        "elasticity": {**BASE, "elasticity": {"enabled": True}},
        "optimizer.params.lr": {**BASE, "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
        "batch sizes disagree": {**BASE, "train_batch_size": 5, "gradient_accumulation_steps": 2},
        "zero_allow_untested_optimizer": {**BASE, "optimizer": {"type": "Lamb", "params": {"lr": 1e-3}},
                                          "zero_optimization": {"stage": 1}},
    }
    (tmp_path / "a_file").write_text("not a folder")
    results = run_distributed(_check_errors, 2, tmp_path, cases)
    for expected, message in results[0].items():
        assert expected in message, (expected, message)


def _check_errors(cases: dict) -> dict:
    out = {key: _initialize_error(cfg) for key, cfg in cases.items()}
    model = TinyNet()
    out["keep one"] = _initialize_error(BASE, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    return out


def _use_after_destroy(stage: int) -> dict[str, str]:
    torch.manual_seed(0)
    model = TinyNet()
    engine, *_ = shardspeed.initialize(model=model, config={**BASE, "zero_optimization": {"stage": stage}})
    x, y = torch.randn(2, IN), torch.randint(0, 4, (2,))
    engine.backward(engine(x, y))
    engine.step()
    engine.destroy()
    out = {}
    for what, call in {"forward": lambda: engine(x, y), "backward": lambda: engine.backward(torch.ones((), requires_grad=True)),
                       "step": engine.step}.items():
        try:
            call()
            out[what] = "no error"
        except RuntimeError as err:
            out[what] = str(err)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_destroyed_engine_says_so(tmp_path, stage):
    """accelerate's free_memory() destroys engines the Hugging Face Trainer may still call (evaluate() then
    train()): every entry point names the destroy instead of failing somewhere inside."""
    (got,) = run_distributed(_use_after_destroy, 1, tmp_path, stage)
    for what in ("forward", "backward", "step"):
        assert got[what].startswith(f"engine.{what}(): this engine was destroyed by engine.destroy()"), got[what]
