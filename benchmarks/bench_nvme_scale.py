"""ZeRO-Infinity at scale: train a model whose model states are several times the process's memory.

    .venv/bin/python benchmarks/bench_nvme_scale.py [--world 1] [--layers 24] [--width 4096]
        [--steps 3] [--nvme-path /tmp] [--lr 1e-4]

Model: `--layers` residual blocks `x + tanh(Linear(width, width, bias=False)(x))`, bf16, built
under `shardspeed.zero.Init` (no rank ever holds the whole model), micro batch 4 of random inputs
(a different batch per rank, the same every step), loss mean(out^2), AdamW (fused CPU kernel),
`gradient_clipping: 1.0`. Defaults: 24 x 4096^2 = 403M parameters, 16 B/param of model states
(2 bf16 parameter + 2 bf16 gradient + 4 fp32 master + 8 Adam) = 6.4 GB, split over the ranks.

ZeRO stage 3 with both offloads on NVMe, in a fresh folder under `--nvme-path` that is removed
afterwards: `offload_param {buffer_count 4, buffer_size width^2}`, `offload_optimizer {buffer_count
2, pipeline_read, pipeline_write}`, `sub_group_size 2^24`, `stage3_max_live_parameters` two layers,
`stage3_prefetch_bucket_size` one layer, `stage3_max_reuse_distance 0`, `wall_clock_breakdown`.
Before building, the drive must have room for ~14 B/param (2 bf16 parameter + 12 optimizer bytes,
all ranks together) plus 10 % and 1 GiB, or the script exits naming the shortfall.

Resident memory, as in tests/distributed/test_offload_memory.py: glibc's mmap threshold is fixed
at 1 MiB (so RSS follows the live tensors), torch's optimizer stack is warmed up, then the
baseline is the current RSS. Peaks are the kernel's VmHWM, reset (`/proc/self/clear_refs` 5) at the
baseline and after each phase, so each phase (build = zero.Init + initialize, each step) has its
own peak; the overall peak is the largest. VmHWM is used rather than ru_maxrss because under
torchrun ru_maxrss starts at the launcher's peak (the kernel carries it over the exec); both are
printed (ru_maxrss as the largest value read before any reset). Growth = overall peak - baseline;
the ratio model states / growth is what the title claims.

Per step (rank 0's wall clock; the table shows the median over steps): forward, backward and step
seconds and the offload timers (offload_grad_copy, optimizer_step_cpu, offload_param_copy,
swap_in_wait, swap_out_wait), read with `elapsed(reset=True)` after each step. Swap bytes are
counted by wrapping `SwapSpace._submit` in this process (bytes handed to the swap files, by file
kind) and cross-checked against the kernel's /proc/self/io read_bytes/write_bytes. GB/s = 1e9 B/s:
the swap traffic over the step's wall time, parameter reads over forward + backward, and optimizer
reads + writes over the engine's step phase.

Checks (exit 1 if one fails, after printing): the losses are finite and change, and the swap
folder is empty after `engine.destroy()`. At the defaults the loss rises at step 2 and falls after:
AdamW's first steps at lr 1e-4 overshoot in a 24-deep stack of width 4096 (plain PyTorch, bf16
weights with fp32 AdamW masters and the same clipping, gives the same losses to 4 digits).

At world > 1 the script relaunches itself with `python -m torch.distributed.run --nproc_per_node=W`
(one thread per rank, gloo); at world 1 it runs in this process (gloo, world of one, torch's
default thread count).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import shardspeed  # noqa: E402
from shardspeed.offload.swap_space import SWAP_FOLDER, SwapSpace  # noqa: E402
from tests.memory import current_rss, fixed_mmap_threshold  # noqa: E402

MICRO_BATCH = 4
STATE_BYTES_PER_PARAM = 16   # bf16 param + bf16 grad + fp32 master + fp32 exp_avg + fp32 exp_avg_sq
SWAP_BYTES_PER_PARAM = 14    # on the drive: bf16 param + fp32 master + 2 fp32 Adam states
PARAM_BUFFERS, OPT_BUFFERS = 4, 2
SUB_GROUP = 1 << 24
TIMERS = ("forward", "backward", "step", "offload_grad_copy", "optimizer_step_cpu", "offload_param_copy",
          "swap_in_wait", "swap_out_wait")
# Breakdown entries that live in this process's memory (the rest are on the drive).
RESIDENT_KEYS = ("parameters", "cpu_parameters", "cpu_parameter_swap_buffers", "persistent_parameters",
                 "gathered_parameters_peak", "gradients", "gradient_buckets_peak", "master_weights",
                 "optimizer_states", "cpu_swap_buffers", "cpu_gradient_staging")
GIB, MIB = float(1 << 30), float(1 << 20)

SWAP_BYTES: Counter = Counter()  # (file kind, "read" | "write") -> bytes handed to SwapSpace


def _count_swap_bytes() -> None:
    """Wrap SwapSpace._submit (in this process only) to count the bytes each request moves."""
    original = SwapSpace._submit

    def counting(self: SwapSpace, key: object, tensor: torch.Tensor, write: bool) -> object:
        kind = "param" if self.path.name.startswith("param_") else "optimizer"
        SWAP_BYTES[(kind, "write" if write else "read")] += tensor.numel() * tensor.element_size()
        return original(self, key, tensor, write)

    SwapSpace._submit = counting


# ---- the model and the config ------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))  # residual, so a deep stack keeps a signal


def make_config(nvme: str, width: int, lr: float) -> dict:
    layer = width * width
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "wall_clock_breakdown": True,
        "optimizer": {"type": "AdamW", "params": {"lr": lr}},
        "zero_optimization": {
            "stage": 3, "sub_group_size": SUB_GROUP, "stage3_max_live_parameters": 2 * layer,
            "stage3_prefetch_bucket_size": layer, "stage3_max_reuse_distance": 0,
            "offload_param": {"device": "nvme", "nvme_path": nvme, "buffer_count": PARAM_BUFFERS, "buffer_size": layer},
            "offload_optimizer": {"device": "nvme", "nvme_path": nvme, "buffer_count": OPT_BUFFERS,
                                  "pipeline_read": True, "pipeline_write": True},
        },
    }


# ---- memory and I/O probes ---------------------------------------------------------------------
def reset_peak() -> bool:
    """Reset the kernel's VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


MAXRSS = [0]  # the largest ru_maxrss read before any reset: what ru_maxrss would say had we never reset


def take_peak() -> int:
    """The phase's peak RSS (VmHWM); then start the next phase's."""
    peak = vm_hwm()
    MAXRSS[0] = max(MAXRSS[0], ru_maxrss())
    reset_peak()
    return peak


def proc_io() -> dict[str, int]:
    """The kernel's storage I/O counters for this process (all threads), in bytes."""
    try:
        with open("/proc/self/io") as f:
            pairs = (line.split(":") for line in f)
            return {k.strip(): int(v) for k, v in pairs if k.strip() in ("read_bytes", "write_bytes")}
    except OSError:
        return {"read_bytes": 0, "write_bytes": 0}


# ---- one rank ----------------------------------------------------------------------------------
def build(args: argparse.Namespace, nvme: str) -> tuple[object, dict]:
    """zero.Init + initialize; returns the engine and the build phase's numbers."""
    cfg = make_config(nvme, args.width, args.lr)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with shardspeed.zero.Init(config_dict_or_path=cfg):
        model = nn.Sequential(*[Block(args.width) for _ in range(args.layers)])
    t1 = time.perf_counter()
    rss_after_init = current_rss()
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    t2 = time.perf_counter()
    return engine, {"zero_init_s": t1 - t0, "initialize_s": t2 - t1, "rss_after_zero_init": rss_after_init,
                    "init_swap_bytes": dict_of(SWAP_BYTES)}


def dict_of(counter: Counter) -> dict[str, int]:
    return {f"{kind}_{op}": n for (kind, op), n in sorted(counter.items())}


def train_step(engine: object, x: torch.Tensor) -> dict:
    """One forward/backward/step; its wall time, timers (ms), swap bytes, I/O and peak RSS."""
    SWAP_BYTES.clear()
    io0 = proc_io()
    t0 = time.perf_counter()
    loss = engine(x).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    value = loss.item()
    seconds = time.perf_counter() - t0
    io1 = proc_io()
    timers = engine.timers.get_timers()
    ms = {name: (timers[name].elapsed(reset=True) if name in timers else 0.0) for name in TIMERS}
    peak = take_peak()
    return {"loss": value, "s": seconds, "timers_ms": ms, "swap": dict_of(SWAP_BYTES), "peak_rss": peak,
            "io_read": io1["read_bytes"] - io0["read_bytes"], "io_write": io1["write_bytes"] - io0["write_bytes"]}


def run_rank(args: argparse.Namespace, nvme: str) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    glibc = fixed_mmap_threshold()
    _count_swap_bytes()
    # Warm-up: torch's first optimizer imports its compiler stack (~70 MiB), which is not ours to count.
    warm = torch.nn.Parameter(torch.zeros(1))
    warm.grad = torch.zeros(1)
    torch.optim.AdamW([warm], fused=True).step()
    del warm
    gc.collect()
    before = current_rss()
    resettable = reset_peak()
    engine, built = build(args, nvme)
    built["rss_after"] = current_rss()
    built["peak_rss"] = take_peak()
    if rank == 0:
        print(f"[rank 0] built in {built['zero_init_s']:.1f} s (zero.Init) + {built['initialize_s']:.1f} s (initialize), "
              f"RSS {built['rss_after'] / MIB:.0f} MiB", flush=True)
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(MICRO_BATCH, args.width, generator=gen).to(torch.bfloat16)
    steps = []
    for i in range(args.steps):
        steps.append(train_step(engine, x))
        if rank == 0:
            s = steps[-1]
            print(f"[rank 0] step {i + 1}: loss {s['loss']:.6f}  {s['s']:.1f} s  peak RSS {s['peak_rss'] / MIB:.0f} MiB",
                  flush=True)
    breakdown = engine.memory_breakdown()
    take_peak()
    maxrss = MAXRSS[0]
    engine.destroy()
    del engine
    gc.collect()
    dist.barrier()  # every rank's files are closed before anyone looks
    leftovers = sorted(p.name for p in (Path(nvme) / SWAP_FOLDER).glob("*")) if (Path(nvme) / SWAP_FOLDER).exists() else []
    return {"rank": rank, "world": world, "glibc_fixed_mmap": glibc, "peak_resettable": resettable,
            "threads": torch.get_num_threads(), "rss_before": before, "build": built, "steps": steps,
            "breakdown": breakdown, "ru_maxrss": maxrss, "leftovers": leftovers}


# ---- the report (rank 0) -----------------------------------------------------------------------
def summarize(r: dict, params: int) -> dict:
    """One rank's headline numbers."""
    peak = max([r["build"]["peak_rss"]] + [s["peak_rss"] for s in r["steps"]])
    growth = peak - r["rss_before"]
    states = STATE_BYTES_PER_PARAM * params // r["world"]
    resident = sum(r["breakdown"].get(k, 0) for k in RESIDENT_KEYS)
    return {"rank": r["rank"], "model_state_bytes": states, "rss_before": r["rss_before"], "peak_rss": peak,
            "peak_rss_growth": growth, "ratio": states / growth if growth > 0 else math.inf,
            "build_peak_growth": r["build"]["peak_rss"] - r["rss_before"],
            "train_peak_growth": max(s["peak_rss"] for s in r["steps"]) - r["rss_before"],
            "breakdown_resident": resident, "ru_maxrss": r["ru_maxrss"]}


def step_stats(steps: list[dict]) -> dict:
    """Medians over steps of rank 0's timings and traffic, and the derived GB/s."""
    med = statistics.median
    sec = med(s["s"] for s in steps)
    timers = {k: med(s["timers_ms"][k] for s in steps) / 1e3 for k in TIMERS}
    keys = sorted({k for s in steps for k in s["swap"]})
    swap = {k: med(s["swap"].get(k, 0) for s in steps) for k in keys}
    read = sum(v for k, v in swap.items() if k.endswith("_read"))
    write = sum(v for k, v in swap.items() if k.endswith("_write"))
    fwd_bwd = timers["forward"] + timers["backward"]
    opt = swap.get("optimizer_read", 0) + swap.get("optimizer_write", 0)
    return {"s_per_step": sec, "timers_s": timers, "swap_bytes": swap, "swap_read": read, "swap_write": write,
            "read_gbps": read / sec / 1e9, "write_gbps": write / sec / 1e9,
            "param_read_gbps_fwd_bwd": swap.get("param_read", 0) / fwd_bwd / 1e9 if fwd_bwd else 0.0,
            "optimizer_gbps_step": opt / timers["step"] / 1e9 if timers["step"] else 0.0,
            "io_read": med(s["io_read"] for s in steps), "io_write": med(s["io_write"] for s in steps)}


def report(args: argparse.Namespace, results: list[dict], wall: float) -> bool:
    params = args.layers * args.width * args.width
    world = len(results)
    rank0 = results[0]
    rows = [summarize(r, params) for r in results]
    stats = step_stats(rank0["steps"])
    losses = [[s["loss"] for s in r["steps"]] for r in results]
    trained = all(all(math.isfinite(v) for v in ls) and ls[-1] != ls[0] for ls in losses)
    leftovers = sorted({f for r in results for f in r["leftovers"]})
    ok = trained and not leftovers

    print(f"\nZeRO-Infinity, NVMe offload of parameters and optimizer: {args.layers} x Linear({args.width}, {args.width}) bf16, "
          f"{params / 1e6:.1f}M parameters, world {world}, micro batch {MICRO_BATCH}, {args.steps} steps, "
          f"{rank0['threads']} torch thread(s)/rank, nvme under {args.nvme_path}")
    print(f"glibc fixed mmap threshold: {rank0['glibc_fixed_mmap']}; VmHWM resettable: {rank0['peak_resettable']}")
    print("\nResident memory per rank (MiB; model states = 16 B/param / world)")
    print(f"{'rank':>4} {'model states':>13} {'RSS before':>11} {'peak RSS':>9} {'peak growth':>12} {'states/growth':>14} "
          f"{'build peak+':>12} {'train peak+':>12} {'breakdown in RAM':>17} {'ru_maxrss':>10}")
    for r in rows:
        print(f"{r['rank']:>4} {r['model_state_bytes'] / MIB:13.0f} {r['rss_before'] / MIB:11.0f} {r['peak_rss'] / MIB:9.0f} "
              f"{r['peak_rss_growth'] / MIB:12.0f} {r['ratio']:13.2f}x {r['build_peak_growth'] / MIB:12.0f} "
              f"{r['train_peak_growth'] / MIB:12.0f} {r['breakdown_resident'] / MIB:17.0f} {r['ru_maxrss'] / MIB:10.0f}")
    print("\nengine.memory_breakdown() per rank (MiB)")
    keys = list(rank0["breakdown"])
    print(f"{'entry':<28}" + "".join(f"{'rank ' + str(r['rank']):>12}" for r in results))
    for k in keys:
        print(f"{k:<28}" + "".join(f"{r['breakdown'].get(k, 0) / MIB:12.1f}" for r in results))
    print(f"\nSeconds per step (rank 0, median of {args.steps}): {stats['s_per_step']:.2f}")
    print("  " + "  ".join(f"{k} {v:.2f}" for k, v in stats["timers_s"].items()))
    print("  per step: " + "  ".join(f"{s['s']:.1f}" for s in rank0["steps"]))
    print("\nSwap traffic per step (rank 0, median; GB = 1e9 B)")
    for k, v in stats["swap_bytes"].items():
        print(f"  {k:<16} {v / 1e9:8.3f} GB")
    print(f"  read {stats['swap_read'] / 1e9:.3f} GB ({stats['read_gbps']:.2f} GB/s over the step), write "
          f"{stats['swap_write'] / 1e9:.3f} GB ({stats['write_gbps']:.2f} GB/s over the step); kernel /proc/self/io: "
          f"read {stats['io_read'] / 1e9:.3f} GB, write {stats['io_write'] / 1e9:.3f} GB")
    if world > 1:
        every = [step_stats(r["steps"]) for r in results]
        read, write = sum(e["swap_read"] for e in every), sum(e["swap_write"] for e in every)
        print(f"  all {world} ranks together (one drive): read {read / 1e9:.3f} GB, write {write / 1e9:.3f} GB per step, "
              f"{(read + write) / stats['s_per_step'] / 1e9:.2f} GB/s over rank 0's step")
    print(f"  parameter reads over forward+backward {stats['param_read_gbps_fwd_bwd']:.2f} GB/s; "
          f"optimizer reads+writes over the step phase {stats['optimizer_gbps_step']:.2f} GB/s")
    b = rank0["build"]
    print(f"\nBuild: zero.Init {b['zero_init_s']:.1f} s (RSS after {b['rss_after_zero_init'] / MIB:.0f} MiB), initialize "
          f"{b['initialize_s']:.1f} s, swap writes at start-up "
          + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in b["init_swap_bytes"].items()))
    for r, ls in zip(results, losses):
        print(f"loss rank {r['rank']}: " + ", ".join(f"{v:.6f}" for v in ls))
    print(f"losses finite and changing: {trained}; swap folder empty after destroy: {not leftovers}"
          + (f" (left: {leftovers})" if leftovers else "") + f"; total wall {wall:.0f} s")
    print(json.dumps({"bench": "nvme_scale", "world": world, "layers": args.layers, "width": args.width, "params": params,
                      "steps": args.steps, "threads_per_rank": rank0["threads"], "s_per_step": stats["s_per_step"],
                      "step_s": [s["s"] for s in rank0["steps"]], "timers_s": stats["timers_s"],
                      "swap_bytes_per_step": stats["swap_bytes"], "swap_read_gbps": stats["read_gbps"],
                      "swap_write_gbps": stats["write_gbps"], "io_read_bytes": stats["io_read"],
                      "io_write_bytes": stats["io_write"], "memory": rows,
                      "breakdown": [r["breakdown"] for r in results], "build": {k: v for k, v in b.items()},
                      "losses": losses, "trained": trained, "swap_leftovers": leftovers, "ok": ok}))
    return ok


# ---- launching ---------------------------------------------------------------------------------
def check_disk(folder: str, params: int) -> None:
    """Exit with the shortfall unless the drive has room for the swap files (all ranks together)."""
    if not os.path.isdir(folder):
        raise SystemExit(f"--nvme-path {folder} is not a folder; point it at a folder on the drive to swap to")
    need = SWAP_BYTES_PER_PARAM * params
    want = int(need * 1.1) + (1 << 30)  # alignment padding, the per-region rounding, and headroom
    free = shutil.disk_usage(folder).free
    print(f"disk: swap needs ~{need / GIB:.2f} GiB ({SWAP_BYTES_PER_PARAM} B/param x {params / 1e6:.1f}M); "
          f"{free / GIB:.1f} GiB free under {folder}", flush=True)
    if free < want:
        raise SystemExit(f"not enough disk under --nvme-path {folder}: {free / GIB:.1f} GiB free, want {want / GIB:.1f} GiB "
                         f"({SWAP_BYTES_PER_PARAM} B/param x {params} params + 10 % + 1 GiB); point --nvme-path at a "
                         "larger drive or shrink --layers/--width")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> int:
    """One rank under torchrun, or the only one: train, gather the results on rank 0, report."""
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    t0 = time.perf_counter()
    result = run_rank(args, args.swap_dir)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(result, gathered, dst=0)
    ok = report(args, gathered, time.perf_counter() - t0) if dist.get_rank() == 0 else True
    dist.destroy_process_group()
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4, help="big enough that bf16 weights move within a few steps")
    ap.add_argument("--nvme-path", default=tempfile.gettempdir(), help="folder on the drive; a fresh subfolder is used")
    ap.add_argument("--swap-dir", help=argparse.SUPPRESS)  # set by the launching process for its ranks
    args = ap.parse_args()
    if args.swap_dir:
        return worker(args)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the loss has to change)")
    check_disk(args.nvme_path, args.layers * args.width * args.width)
    args.swap_dir = tempfile.mkdtemp(prefix="bench_nvme_scale_", dir=args.nvme_path)
    try:
        if args.world == 1:
            code = worker(args)
        else:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world}", "--nnodes=1",
                   f"--master_port={free_port()}", __file__, *sys.argv[1:], "--swap-dir", args.swap_dir]
            code = subprocess.run(cmd, env=env).returncode
        left = sorted(str(p.relative_to(args.swap_dir)) for p in Path(args.swap_dir).rglob("*") if not p.is_dir())
        if left:
            print(f"swap folder {args.swap_dir} not empty after the run: {left}", flush=True)
            code = code or 1
        return code
    finally:
        shutil.rmtree(args.swap_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
