"""The GPU check for ZeRO: CUDA/NCCL code paths on one GPU, then a side-by-side speed and memory run.

    python3 -m torch.distributed.run --nproc_per_node 1 benchmarks/gpu_zero3.py [--out DIR] [--quick]

Runs as one process (world size 1, NCCL). With one rank, shardspeed's gathers and reductions
are plain copies; this script gives every engine `CommPolicy.native(collectives_at_world_1=True)` so
stage 3 really calls NCCL's all_gather_into_tensor / reduce_scatter_tensor.

Part 1, correctness on the GPU: stage 3 (tiny persistence threshold, a live-parameter cap that
forces release and re-gather, prefetch on) against stage 0 in fp32 (TF32 off): same losses and
weights; bf16 stage 3 against bf16 stage 0: same losses within bf16 rounding; zero.Init on CUDA
builds the same weights as building the model whole.

Part 2, speed: a GPT of about 200M parameters in bf16 (12 layers, hidden 1024, seq 1024, micro
batch 8, AdamW): plain PyTorch (bf16 parameters, fused AdamW), FSDP2 (`fully_shard` per block and
root, default resharding, bf16 parameters), shardspeed stages 0, 2 and 3 (bf16 with fp32 masters),
tokens/s and peak GPU memory. Prints a table and writes gpu_results.json to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import shardspeed  # noqa: E402
from gpt import GPT, GPTConfig  # noqa: E402
from shardspeed.comm.collectives import CommPolicy  # noqa: E402


def batches(cfg: GPTConfig, micro: int, n: int, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (micro, cfg.seq_len + 1), generator=g)
        out.append((ids[:, :-1].to(device), ids[:, 1:].to(device)))
    return out


def ds_config(stage: int, bf16: bool, **zero: object) -> dict:
    return {"train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
            "zero_optimization": {"stage": stage, **zero}}


def train_engine(cfg: GPTConfig, config: dict, data: list, seed: int = 0, init: bool = False) -> tuple[list[float], dict]:
    torch.manual_seed(seed)
    if init:
        with shardspeed.zero.Init(config_dict_or_path=config):
            model = GPT(cfg)
    else:
        model = GPT(cfg)
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    _collectives_at_world_1(engine)
    losses = []
    for x, y in data:
        loss = engine(x, labels=y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    weights = engine._zero3_consolidated_16bit_state_dict() if config["zero_optimization"]["stage"] == 3 else \
        {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
    engine.destroy()
    return losses, weights


def part1(device: torch.device) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = GPTConfig(vocab_size=512, seq_len=128, num_layers=4, hidden_size=256, num_heads=4)
    data = batches(cfg, 8, 10, device)
    capped = {"stage3_param_persistence_threshold": 300, "stage3_max_live_parameters": 300_000,
              "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 200_000}
    results = {}
    ref_losses, ref_weights = train_engine(cfg, ds_config(0, False), data)
    z3_losses, z3_weights = train_engine(cfg, ds_config(3, False, **capped), data)
    worst = max(abs(a - b) / abs(b) for a, b in zip(z3_losses, ref_losses))
    wdiff = max((z3_weights[k].float() - v.float()).abs().max().item() for k, v in ref_weights.items())
    results["fp32_stage3_vs_stage0"] = {"max_rel_loss_diff": worst, "max_abs_weight_diff": wdiff,
                                        "ok": worst < 1e-4 and wdiff < 1e-4}
    b_ref, _ = train_engine(cfg, ds_config(0, True), data)
    b_z3, _ = train_engine(cfg, ds_config(3, True, **capped), data)
    worst = max(abs(a - b) / abs(b) for a, b in zip(b_z3, b_ref))
    results["bf16_stage3_vs_stage0"] = {"max_rel_loss_diff": worst, "ok": worst < 2e-2,
                                        "losses_stage3": b_z3, "losses_stage0": b_ref}
    torch.manual_seed(0)
    with device:  # zero.Init creates tensors on the device, so compare with a whole model built there
        whole = GPT(cfg).state_dict()
    _, init_weights = train_engine(cfg, ds_config(3, False, **capped), [], init=True)
    idiff = max((init_weights[k].float() - v.float().cpu()).abs().max().item() for k, v in whole.items())
    results["zero_init_same_weights"] = {"max_abs_diff": idiff, "ok": idiff == 0.0}
    torch.backends.cuda.matmul.allow_tf32 = True
    return results


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, n_warm: int, n_steps: int, tokens_per_step: int) -> dict:
    for _ in range(n_warm):
        step()
    _sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    _sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"tokens_per_s": tokens_per_step * n_steps / elapsed, "s_per_step": elapsed / n_steps, "peak_gib": peak}


def part2(device: torch.device, quick: bool, profile: bool = False) -> dict:
    cfg = GPTConfig(vocab_size=32768, seq_len=1024, num_layers=12, hidden_size=1024, num_heads=16, tie_embeddings=False)
    if quick:
        cfg = GPTConfig(vocab_size=512, seq_len=64, num_layers=2, hidden_size=64, num_heads=2, tie_embeddings=False)
    micro, warm, steps = 8, 3, 10
    data = batches(cfg, micro, 1, device)[0]
    tokens = micro * cfg.seq_len
    out = {}

    def run_torch(kind: str) -> dict:
        torch.manual_seed(0)
        model = GPT(cfg).to(device).bfloat16()
        if kind == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step():
            loss = model(data[0], labels=data[1])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return timed(step, warm, steps, tokens)

    def run_shardspeed(stage: int, profile: bool = False, **zero: object) -> dict:
        torch.manual_seed(0)
        model = GPT(cfg)
        config = ds_config(stage, True, overlap_comm=True, **zero)
        config["optimizer"]["params"]["lr"] = 1e-4
        engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        _collectives_at_world_1(engine)

        def step():
            loss = engine(data[0], labels=data[1])
            engine.backward(loss)
            engine.step()

        result = timed(step, warm, steps, tokens)
        result["memory_breakdown"] = engine.memory_breakdown()
        if profile:  # where a step's host and device time go
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                _sync()
            result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)
            print(result["profile"], flush=True)
        engine.destroy()
        return result

    systems = [("torch (bf16 params, fused AdamW)", lambda: run_torch("plain")),
               ("FSDP2 (bf16 params, default reshard)", lambda: run_torch("fsdp2")),
               ("shardspeed stage 0 (bf16, fp32 masters)", lambda: run_shardspeed(0)),
               ("shardspeed stage 2 (bf16, fp32 masters)", lambda: run_shardspeed(2)),
               ("shardspeed stage 3 (bf16, fp32 masters)", lambda: run_shardspeed(3, profile=profile)),
               ("shardspeed stage 3, blocks as leaf modules", lambda: run_shardspeed(
                   3, leaf_module={"classes": ["Block"], "names": [], "name_suffixes": []})),
               ("shardspeed stage 3, 2-block live cap", lambda: run_shardspeed(
                   3, stage3_max_live_parameters=2 * 12 * cfg.hidden_size ** 2, stage3_max_reuse_distance=0))]
    params = sum(p.numel() for p in GPT(cfg).parameters())
    out["model"] = {"parameters": params, "layers": cfg.num_layers, "hidden": cfg.hidden_size, "seq": cfg.seq_len, "micro": micro}
    for name, fn in systems:
        try:
            out[name] = fn()
        except Exception as exc:  # report and go on: one broken system must not hide the others
            out[name] = {"error": repr(exc)[:500]}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(name, json.dumps({k: v for k, v in out[name].items() if k != "profile"}, default=str)[:400], flush=True)
    return out


def _collectives_at_world_1(engine: object) -> None:
    """Run the NCCL collectives even at world size 1 (where they would be plain copies)."""
    policy = CommPolicy.native(collectives_at_world_1=True)
    strategy = engine.strategy
    if hasattr(strategy, "manager"):
        strategy.manager.set_policy(policy)
    if hasattr(strategy, "reducer"):
        strategy.reducer.policy = policy


def rank_device() -> tuple[torch.device, str]:
    """This rank's GPU (made current) and its name; on a CPU machine the CPU, for a dry run of a script's
    logic over gloo (figures mean nothing there)."""
    if not torch.cuda.is_available():
        return torch.device("cpu"), "none (CPU dry run)"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device, torch.cuda.get_device_name(device)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="a tiny model in part 2 (for a dry run)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of three stage-3 steps")
    args = parser.parse_args()
    shardspeed.init_distributed()
    device, gpu = rank_device()
    report = {"torch": torch.__version__, "gpu": gpu, "backend": dist.get_backend()}
    print(json.dumps(report), flush=True)
    t0 = time.perf_counter()
    report["part1"] = part1(device)
    print("part1", json.dumps(report["part1"]), f"({time.perf_counter() - t0:.0f}s)", flush=True)
    report["part2"] = part2(device, args.quick, args.profile)
    rows = [(k, v) for k, v in report["part2"].items() if k != "model"]
    base = report["part2"]["torch (bf16 params, fused AdamW)"].get("tokens_per_s")
    print(f"\nmodel: {report['part2']['model']}")
    print(f"{'system':44s} {'tokens/s':>10s} {'vs torch':>9s} {'peak GiB':>9s}")
    for name, r in rows:
        if "error" in r:
            print(f"{name:44s} ERROR {r['error'][:120]}")
            continue
        ratio = r["tokens_per_s"] / base if base else float("nan")
        print(f"{name:44s} {r['tokens_per_s']:10.0f} {ratio:9.3f} {r['peak_gib']:9.2f}")
    with open(os.path.join(args.out, "gpu_results.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
