"""ZeRO-Infinity keeps a process's resident memory bounded: model states far bigger than it train.

A 67M-parameter bf16 stack (16 bytes of model state per parameter: 2 parameter + 2 gradient +
4 master + 8 Adam, 512 MiB per rank at world 2) is built under `zero.Init` and trained with
parameters and optimizer states on NVMe. What must stay in memory per rank is the gradient
partition (2 bytes/param / N), the swap buffer pools, the fp32 gradient staging of one sub-group,
the gathered units allowed by `stage3_max_live_parameters`, and activations. The resident growth
is checked against that budget, which is a fraction of the model states: a run that kept the
parameter partitions (64 MiB per rank), masters (128 MiB) or Adam states (256 MiB) in memory would
exceed it.

The baseline is read after a two-layer run of the same configuration, so what any first run costs
once (lazy imports, I/O threads, the CPU kernels' caches for these shapes, which differ between CPUs:
+26 MiB on one CI machine without it) is not counted as growth.
"""
from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import shardspeed
from tests.harness import run_distributed
from tests.memory import (current_rss, fixed_mmap_threshold, one_malloc_arena, peak_rss_since_reset,
                          release_free_memory, reset_peak_rss)

LAYERS, WIDTH = 64, 1024
SUB_GROUP = 1 << 20          # elements per optimizer sub-group
PARAM_BUFFERS, OPT_BUFFERS = 3, 2
LIVE = 2 * WIDTH * WIDTH     # two layers gathered at most
MIB = 2 ** 20


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))  # residual, so 32 layers keep a signal


def _config(nvme: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": SUB_GROUP, "stage3_max_live_parameters": LIVE,
            "stage3_prefetch_bucket_size": WIDTH * WIDTH, "stage3_max_reuse_distance": 0,
            "offload_param": {"device": "nvme", "nvme_path": nvme, "buffer_count": PARAM_BUFFERS, "buffer_size": WIDTH * WIDTH},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "buffer_count": OPT_BUFFERS,
                                  "pipeline_read": True, "pipeline_write": True},
        },
    }


def _run(cfg: dict, layers: int, steps: int):
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        model = nn.Sequential(*[Block() for _ in range(layers)])
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(4, WIDTH, dtype=torch.bfloat16)
    losses = []
    for _ in range(steps):
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return engine, losses


def _train(nvme: str) -> dict:
    if not fixed_mmap_threshold():
        return {"skip": "not glibc"}
    # One heap for every thread: otherwise how the work spread over gloo's and the swap I/O's threads (which
    # varies with the machine's load) decides how many per-thread arenas hold freed pages: +128 MiB seen in
    # a loaded full-suite run.
    one_malloc_arena()
    world = dist.get_world_size()
    cfg = _config(nvme)
    torch.manual_seed(0)
    # Warm-up: a small run of the same configuration pays for what a first run costs once.
    warm, _ = _run(cfg, 2, 2)
    warm.destroy()
    del warm
    gc.collect()
    release_free_memory()
    before = current_rss()
    reset_peak_rss()
    engine, losses = _run(cfg, LAYERS, 3)
    growth = peak_rss_since_reset() - before
    breakdown = engine.memory_breakdown()
    engine.destroy()
    numel = LAYERS * WIDTH * WIDTH
    return {"growth": growth, "losses": losses, "breakdown": breakdown, "model_states": 16 * numel // world,
            "budget": (2 * numel // world                      # bf16 gradient partition
                       + PARAM_BUFFERS * 2 * numel // LAYERS // world   # parameter swap pool
                       + OPT_BUFFERS * 12 * SUB_GROUP + 4 * SUB_GROUP   # optimizer swap pool and fp32 grad staging
                       + 2 * LIVE * 2                                  # gathered layers (and one gather's buffers)
                       + 40 * MIB)}                                    # activations, collectives, allocator slack


@pytest.mark.timeout(300)
def test_nvme_offload_keeps_resident_memory_bounded(tmp_path: Path) -> None:
    (tmp_path / "nvme").mkdir()
    results = run_distributed(_train, 2, tmp_path, str(tmp_path / "nvme"), deadline=240)
    if "skip" in results[0]:
        pytest.skip(results[0]["skip"])
    for rank, r in enumerate(results):
        assert r["losses"][-1] < r["losses"][0], f"rank {rank} did not train: {r['losses']}"
        b = r["breakdown"]
        assert b["nvme_parameters"] >= 2 * LAYERS * WIDTH * WIDTH // 2 and b["nvme_optimizer_states"] > 0
        # the budget is well under the model states, so this fails if any of them stayed in memory
        assert r["budget"] < 0.5 * r["model_states"]
        assert r["growth"] < r["budget"], (
            f"rank {rank}: resident memory grew {r['growth'] / MIB:.0f} MiB, budget {r['budget'] / MIB:.0f} MiB "
            f"(model states {r['model_states'] / MIB:.0f} MiB per rank)")
    assert not list((tmp_path / "nvme").glob("shardspeed_swap/*")), "swap files left behind"
