"""ZeRO-Offload and ZeRO-Infinity: training with the optimizer in host memory or on NVMe equals training without.

Every scenario trains the same model from the same weights twice in one job, once without offload
and once with it, and returns both runs' losses, gradient norms and final (consolidated) weights.
With DeepSpeed's default `sub_group_size` the arithmetic is the same op for op, so the runs must be
bit-identical; with small sub-groups the fused Adam kernel's vectorised/scalar split moves, which
may change the last bit of a few elements, so those compare at fp32 rounding.

All scenarios of one world size run in one spawned job (spawning dominates the cost here).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist

import shardspeed
from tests.harness import ScenarioRuns, run_named
from tests.models import Deep

STEPS, GAS, MICRO = 3, 2, 2
CLIP = 2e-4  # active on every step (asserted), so the clip factor is part of what must match
DEADLINE = 240.0
SMALL_SUB_GROUP = 1500  # several sub-groups per rank, cut inside parameters at stages 1-2


def _config(stage: int, dtype: str, offload: dict | None, sub_group_size: int | None = None, param: dict | None = None,
            **extra: Any) -> dict:
    zero: dict[str, Any] = {"stage": stage, "stage3_param_persistence_threshold": 100, "reduce_bucket_size": 5000,
                            "stage3_max_live_parameters": 9000, "stage3_prefetch_bucket_size": 9000}
    if offload is not None:
        zero["offload_optimizer"] = offload
    if param is not None:
        zero["offload_param"] = param
    if sub_group_size is not None:
        zero["sub_group_size"] = sub_group_size
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "gradient_clipping": CLIP,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
            "bf16": {"enabled": dtype == "bf16"}, "zero_optimization": zero, **extra}


def _groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def _batches(dtype: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    world = dist.get_world_size()
    out = []
    for _ in range(STEPS * GAS):
        x = torch.randn(world * MICRO, 64, generator=g)
        out.append(x[dist.get_rank() * MICRO:(dist.get_rank() + 1) * MICRO])
    return [x.bfloat16() if dtype == "bf16" else x for x in out]


def _engine(config: dict) -> Any:
    torch.manual_seed(0)
    model = Deep()
    engine, *_ = shardspeed.initialize(model=model, model_parameters=_groups(model), config=config)
    return engine


def _train(engine: Any, batches: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    losses, norms = [], []
    for x in batches:
        steps = engine.global_steps
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if engine.global_steps != steps:
            norms.append(engine.get_global_grad_norm())
    return losses, norms


def _weights(engine: Any) -> dict[str, torch.Tensor]:
    state = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else engine.module_state_dict()
    if engine.zero_optimization_stage() == 3:
        out = [None]
        dist.broadcast_object_list(out if dist.get_rank() else [state], src=0)
        state = out[0] if dist.get_rank() else state
    return {k: v.float().clone() for k, v in state.items()}


def _pair(stage: int, dtype: str, offload: dict, sub_group_size: int | None = None, param: dict | None = None) -> dict:
    """Train without and with offload; report both, plus what the offloaded engine looked like."""
    batches = _batches(dtype)
    out: dict[str, Any] = {}
    for label, section in (("plain", None), ("offload", offload)):
        engine = _engine(_config(stage, dtype, section, sub_group_size, param if section else None, wall_clock_breakdown=True))
        losses, norms = _train(engine, batches)
        out[label] = {"losses": losses, "norms": norms, "weights": _weights(engine)}
        if section is not None:
            strategy = engine.strategy
            out["sub_groups"] = len(strategy.offload.sub_groups)
            out["breakdown"] = engine.memory_breakdown()
            out["timers"] = sorted(engine.timers.get_timers())
            folder = Path(offload.get("nvme_path") or (param or {}).get("nvme_path") or "/nonexistent") / "shardspeed_swap"
            dist.barrier()  # every rank has created its swap file ...
            out["swap_files_during"] = sorted(p.name for p in folder.glob("*")) if folder.exists() else []
            dist.barrier()  # ... and no rank removes its own before all have looked
            engine.destroy()
            dist.barrier()
            out["swap_files_after"] = sorted(p.name for p in folder.glob("*")) if folder.exists() else []
    return out


def _checkpoint_roundtrip(stage: int, dtype: str, offload: dict, save_dir: str, param: dict | None = None) -> dict:
    """Save with offload after 2 of 3 steps; resume with offload, and without offload: both equal the uninterrupted run."""
    batches = _batches(dtype)
    first, rest = batches[:2 * GAS], batches[2 * GAS:]
    engine = _engine(_config(stage, dtype, offload, param=param))
    _train(engine, first)
    engine.save_checkpoint(save_dir, tag="t")
    reference = _train(engine, rest)[0], _weights(engine)
    engine.destroy()
    resumed = {}
    for label, section in (("offload", offload), ("plain", None), ("cpu", {"device": "cpu"})):
        fresh = _engine(_config(stage, dtype, section, param=param if label == "offload" else None))
        fresh.load_checkpoint(save_dir, tag="t")
        resumed[label] = (_train(fresh, rest)[0], _weights(fresh))
        fresh.destroy()
    return {"reference": reference, "resumed": resumed}


def _scenarios(nvme: str, save: str) -> dict[str, Callable[[], Any]]:
    nv = {"device": "nvme", "nvme_path": nvme, "buffer_count": 2, "pipeline_read": True, "pipeline_write": True}
    out: dict[str, Callable[[], Any]] = {}
    for stage in (1, 2, 3):
        for dtype in ("fp32", "bf16"):
            out[f"cpu-s{stage}-{dtype}"] = lambda s=stage, d=dtype: _pair(s, d, {"device": "cpu"})
            out[f"cpu-small-s{stage}-{dtype}"] = lambda s=stage, d=dtype: _pair(s, d, {"device": "cpu"}, SMALL_SUB_GROUP)
            out[f"nvme-s{stage}-{dtype}"] = lambda s=stage, d=dtype: _pair(s, d, nv, SMALL_SUB_GROUP)
    for dtype in ("fp32", "bf16"):
        out[f"param-cpu-s3-{dtype}"] = lambda d=dtype: _pair(3, d, {"device": "cpu"}, param={"device": "cpu"})
        # two buffers for a dozen units: prefetch runs out of buffers and fetches must free them
        out[f"param-nvme-s3-{dtype}"] = lambda d=dtype: _pair(3, d, nv, SMALL_SUB_GROUP, param={
            "device": "nvme", "nvme_path": nvme, "buffer_count": 2, "buffer_size": 5000})
    out["nvme-unpipelined-s2-bf16"] = lambda: _pair(2, "bf16", {**nv, "pipeline_read": False, "pipeline_write": False,
                                                                 "buffer_count": 1}, SMALL_SUB_GROUP)
    for stage in (2, 3):
        out[f"ckpt-nvme-s{stage}"] = lambda s=stage: _checkpoint_roundtrip(s, "bf16", {**nv}, os.path.join(save, f"s{s}"))
    out["ckpt-param-nvme-s3"] = lambda: _checkpoint_roundtrip(3, "bf16", {**nv}, os.path.join(save, "param"), param={
        "device": "nvme", "nvme_path": nvme, "buffer_count": 3, "buffer_size": 5000})
    return out


PER_WORLD = {
    1: ["param-cpu-s3-fp32", "param-nvme-s3-fp32", "param-nvme-s3-bf16", "ckpt-param-nvme-s3", "cpu-s1-fp32", "cpu-s2-bf16", "cpu-s3-fp32", "cpu-small-s2-fp32", "cpu-small-s3-bf16", "nvme-s1-bf16",
        "nvme-s2-fp32", "nvme-s3-bf16", "ckpt-nvme-s2", "ckpt-nvme-s3"],
    2: [f"cpu-s{stage}-{dtype}" for stage in (1, 2, 3) for dtype in ("fp32", "bf16")]
       + [f"cpu-small-s{stage}-fp32" for stage in (1, 2, 3)] + [f"nvme-s{stage}-bf16" for stage in (1, 2, 3)]
       + ["param-cpu-s3-fp32", "param-cpu-s3-bf16", "param-nvme-s3-fp32", "param-nvme-s3-bf16"]
       + ["nvme-unpipelined-s2-bf16", "ckpt-nvme-s2", "ckpt-nvme-s3", "ckpt-param-nvme-s3"],
    4: ["cpu-s2-bf16", "cpu-s3-bf16", "nvme-s3-fp32", "param-nvme-s3-bf16"],
}


def _run(names: list[str], nvme: str, save: str) -> dict[str, tuple[str, Any]]:
    return run_named(_scenarios(nvme, save), names)


def _job_args(world: int, tmp: Path) -> tuple:
    (tmp / "nvme").mkdir()
    return PER_WORLD[world], str(tmp / "nvme"), str(tmp / "ckpt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "offload", _run, _job_args, DEADLINE)


def _assert_same(plain: dict, offload: dict, exact: bool) -> None:
    if exact:
        assert offload["losses"] == plain["losses"]
        assert offload["norms"] == plain["norms"]
        for name, value in plain["weights"].items():
            assert torch.equal(offload["weights"][name], value), name
        return
    torch.testing.assert_close(offload["losses"], plain["losses"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(offload["norms"], plain["norms"], rtol=1e-6, atol=1e-7)
    for name, value in plain["weights"].items():
        torch.testing.assert_close(offload["weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)


CASES = [(w, name) for w, names in PER_WORLD.items() for name in names if not name.startswith("ckpt")]


@pytest.mark.timeout(DEADLINE + 60)
@pytest.mark.parametrize("world,name", CASES)
def test_offload_matches_no_offload(runs: ScenarioRuns, world: int, name: str) -> None:
    results = runs(world, name)
    for rank, r in enumerate(results):
        exact = "small" not in name and "nvme" not in name  # default sub_group_size: the same arithmetic op for op
        _assert_same(r["plain"], r["offload"], exact)
        # gradients are clipped on every step, and training moved
        assert all(n > CLIP for n in r["plain"]["norms"])
        assert r["plain"]["losses"][-1] != r["plain"]["losses"][0]
        if "small" in name or "nvme" in name:
            assert r["sub_groups"] > 2, f"rank {rank}: expected several sub-groups, got {r['sub_groups']}"
        assert {"offload_grad_copy", "optimizer_step_cpu", "offload_param_copy"} <= set(r["timers"])
        breakdown = r["breakdown"]
        assert breakdown["master_weights"] == 0 and breakdown["optimizer_states"] == 0
        if "nvme" in name:
            assert breakdown["nvme_master_weights"] > 0 and breakdown["nvme_optimizer_states"] >= 2 * breakdown["nvme_master_weights"]
            assert {"swap_in_wait", "swap_out_wait"} <= set(r["timers"])
            # The swap files are unlinked as soon as they are open: no name is ever left to clean up.
            assert breakdown["nvme_file"] > 0
            assert r["swap_files_during"] == [] and r["swap_files_after"] == [], (r["swap_files_during"], r["swap_files_after"])
        if "param-" in name:  # only the persistent units' (biases') shards stay on the compute device
            assert breakdown["parameters"] <= breakdown["persistent_parameters"]
            where = "nvme_parameters" if "nvme" in name else "cpu_parameters"
            assert breakdown[where] > 50 * breakdown["parameters"], breakdown
        if "nvme" not in name:
            assert breakdown["cpu_master_weights"] > 0 and breakdown["cpu_optimizer_states"] >= 2 * breakdown["cpu_master_weights"]


@pytest.mark.timeout(DEADLINE + 60)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", ["ckpt-nvme-s2", "ckpt-nvme-s3", "ckpt-param-nvme-s3"])
def test_checkpoint_with_nvme_offload_resumes_with_and_without_offload(runs: ScenarioRuns, world: int, name: str) -> None:
    if name not in PER_WORLD[world]:
        pytest.skip(f"{name} runs at world 2 only")
    for r in runs(world, name):
        ref_losses, ref_weights = r["reference"]
        for label, (losses, weights) in r["resumed"].items():
            assert losses == ref_losses, label
            for name, value in ref_weights.items():
                assert torch.equal(weights[name], value), (label, name)
