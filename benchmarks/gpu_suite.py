"""One GPU suite (issue 17): a ~1.4B GPT in bf16 at sequence 2048 on one GPU, every memory layout side by side.

    python3 -m torch.distributed.run --nproc_per_node 1 benchmarks/gpu_suite.py [--out DIR] [--quick] [--steps 5]

Prepared to run in under 8 minutes on one H100 or H200 with what that machine has (no network: if
DeepSpeed is not importable there, its rows say so; carry a wheel to install it first). Systems:
- plain PyTorch: bf16 parameters, fused AdamW;
- shardspeed stage 0, 2 and 3 (bf16 with fp32 masters);
- shardspeed stage 2 with `offload_optimizer: cpu` (the CPU Adam step overlapped with backward);
- shardspeed stage 3 with parameters and optimizer states offloaded to CPU;
- the same five shardspeed configurations under DeepSpeed 0.19.8, when it imports.
Per system: tokens/s, MFU (6 x parameters x tokens/s over the card's dense bf16 peak), peak GPU memory,
peak host RSS growth and host bytes per parameter. Then the largest model (more layers of the same
width) that trains with full offload, found by doubling then bisecting the layer count within a time
budget. Targets checked (from the issue): offloaded stage 2 >= 1.5x DeepSpeed's tokens/s; host bytes
per parameter with offload <= 17 (DeepSpeed measured 22.8). Writes gpu_suite.json to --out.

`--quick` runs the same logic with a tiny model, also on a CPU machine (gloo), as a dry run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpt import GPT, GPTConfig  # noqa: E402
from gpu_zero3 import _collectives_at_world_1, batches, rank_device, timed  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) by card name, for MFU.
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
SPEED_VS_DEEPSPEED = 1.5
HOST_BYTES_PER_PARAM = 17.0


def _peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAKS.items() if k in name), None)


def _rss_bytes() -> int:
    """Resident memory now (systems run one after another in this process, so a peak would carry over)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _config(stage: int, micro: int, offload: str = "none") -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": True}
    if offload in ("optimizer", "all"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "all":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.1}}, "zero_optimization": zero}


def _engine_system(lib: Any, cfg: GPTConfig, micro: int, stage: int, offload: str, data: Any,
                   warm: int, steps: int, native: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(cfg)
    params = sum(p.numel() for p in model.parameters())
    gc.collect()
    rss_before = _rss_bytes()
    engine, *_ = lib.initialize(model=model, model_parameters=model.parameters(), config=_config(stage, micro, offload))
    if native:
        _collectives_at_world_1(engine)

    def step() -> None:
        loss = engine(data[0], labels=data[1])
        engine.backward(loss)
        engine.step()

    result = timed(step, warm, steps, micro * cfg.seq_len)
    held = _rss_bytes() - rss_before  # host memory the system holds while training (pinned buffers included)
    result["host_growth_gib"] = held / 2**30
    result["host_bytes_per_param"] = held / params
    if hasattr(engine, "memory_breakdown"):
        result["memory_breakdown"] = engine.memory_breakdown()
    if hasattr(engine, "destroy"):
        engine.destroy()
    return result


def _torch_system(cfg: GPTConfig, micro: int, data: Any, device: torch.device, warm: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = GPT(cfg).to(device).bfloat16()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        loss = model(data[0], labels=data[1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, warm, steps, micro * cfg.seq_len)


def _largest_offloaded(lib: Any, width_cfg: dict[str, Any], micro: int, device: torch.device, budget_s: float) -> dict[str, Any]:
    """Double the layer count until full offload fails (out of memory) or the budget runs out, then bisect."""
    def trains(layers: int) -> bool:
        cfg = GPTConfig(**{**width_cfg, "num_layers": layers})
        try:
            data = batches(cfg, micro, 1, device)[0]
            _engine_system(lib, cfg, micro, 3, "all", data, 1, 1, native=True)
            return True
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # host or device OOM ends the search
            print(f"  {layers} layers: {repr(exc)[:120]}", flush=True)
            return False
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    start, good, bad = time.perf_counter(), width_cfg["num_layers"], None
    layers = good
    while time.perf_counter() - start < budget_s:
        layers = good * 2 if bad is None else (good + bad) // 2
        if bad is not None and layers == good:
            break
        if trains(layers):
            good = layers
        else:
            bad = layers
    cfg = GPTConfig(**{**width_cfg, "num_layers": good})
    return {"layers": good, "parameters": sum(p.numel() for p in GPT(cfg).parameters()), "searched_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="a tiny model: a dry run of the logic (CPU works)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--search-budget", type=float, default=90.0, help="seconds for the largest-model search")
    args = parser.parse_args()
    import shardspeed

    shardspeed.init_distributed()
    device, gpu = rank_device()
    # ~1.4B parameters: 24 layers of width 2048, vocabulary 32768, untied head
    width = dict(vocab_size=32768, seq_len=2048, num_layers=24, hidden_size=2048, num_heads=16, tie_embeddings=False)
    micro = 4
    if args.quick:
        width = dict(vocab_size=512, seq_len=64, num_layers=2, hidden_size=64, num_heads=2, tie_embeddings=False)
        micro = 2
    cfg = GPTConfig(**width)
    data = batches(cfg, micro, 1, device)[0]
    params = sum(p.numel() for p in GPT(cfg).parameters())
    peak = _peak_flops(gpu)
    report: dict[str, Any] = {"torch": torch.__version__, "gpu": gpu, "parameters": params, "model": width, "micro": micro}
    peers: list[tuple[str, Any, bool]] = [("shardspeed", shardspeed, True)]
    try:
        import deepspeed  # the peer, when this machine has it

        if "shardspeed" in str(getattr(deepspeed, "__version__", "")):
            report["deepspeed"] = "`deepspeed` is shardspeed's alias here; install DeepSpeed 0.19.8 to compare"
        else:
            peers.append(("deepspeed", deepspeed, False))
    except Exception as exc:  # no network on the GPU machine: say so, run shardspeed alone
        report["deepspeed"] = f"not importable: {exc!r}"[:200]
    layouts = [("stage 0", 0, "none"), ("stage 2", 2, "none"), ("stage 3", 3, "none"),
               ("stage 2 + offload_optimizer cpu", 2, "optimizer"), ("stage 3 + offload params and optimizer", 3, "all")]
    systems: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("torch (bf16 params, fused AdamW)", lambda: _torch_system(cfg, micro, data, device, 2, args.steps))]
    for lib_name, lib, native in peers:
        for name, stage, offload in layouts:
            systems.append((f"{lib_name} {name}", lambda lib=lib, stage=stage, offload=offload, native=native:
                            _engine_system(lib, cfg, micro, stage, offload, data, 2, args.steps, native)))
    print(json.dumps(report), flush=True)
    results: dict[str, Any] = {}
    for name, run in systems:
        try:
            r = run()
            if peak:
                r["mfu"] = 6 * params * r["tokens_per_s"] / peak
            results[name] = r
        except Exception as exc:  # one failing system must not hide the others
            results[name] = {"error": repr(exc)[:300]}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "memory_breakdown"}, default=str)[:300], flush=True)
    report["systems"] = results
    report["largest_full_offload"] = _largest_offloaded(shardspeed, width, micro, device, 5.0 if args.quick else args.search_budget)
    ours = results.get("shardspeed stage 2 + offload_optimizer cpu", {})
    theirs = results.get("deepspeed stage 2 + offload_optimizer cpu", {})
    if "tokens_per_s" in ours and "tokens_per_s" in theirs:
        ratio = ours["tokens_per_s"] / theirs["tokens_per_s"]
        report["offload_stage2_vs_deepspeed"] = {"ratio": ratio, "target": SPEED_VS_DEEPSPEED, "met": ratio >= SPEED_VS_DEEPSPEED}
    host = ours.get("host_bytes_per_param")
    if host is not None:
        report["host_bytes_per_param"] = {"value": host, "target": HOST_BYTES_PER_PARAM, "met": host <= HOST_BYTES_PER_PARAM}
    print(f"\n{gpu}: {params / 1e9:.2f}B parameters, sequence {cfg.seq_len}, micro batch {micro}")
    print(f"{'system':48s} {'tokens/s':>10s} {'MFU':>6s} {'GPU GiB':>8s} {'host B/param':>13s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:48s} ERROR {r['error'][:100]}")
            continue
        print(f"{name:48s} {r['tokens_per_s']:10.0f} {r.get('mfu', float('nan')):6.3f} {r['peak_gib']:8.2f} "
              f"{r.get('host_bytes_per_param', float('nan')):13.1f}")
    print("largest model with full offload:", report["largest_full_offload"])
    for key in ("offload_stage2_vs_deepspeed", "host_bytes_per_param"):
        if key in report:
            print(key, report[key])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
