"""Activation checkpointing: memory kept for backward and step time, with and without checkpointing
every transformer block, in interleaved rounds.

    .venv/bin/python benchmarks/bench_activation_checkpointing.py [--rounds 3] [--steps 3] [--warmup 1]
        [--threads 2] [--systems plain,shardspeed,torch,deepspeed] [--ds-python PATH]

Model: the example GPT (examples/gpt.py): 6 layers, hidden 512, 8 heads, sequence 256, vocab 8192,
dropout 0.1, fp32, micro batch 8, one process. Systems, each in its own process:
- plain: no checkpointing (the baseline);
- shardspeed: every block through `shardspeed.checkpointing.checkpoint` (default settings);
- torch: every block through `torch.utils.checkpoint.checkpoint(use_reentrant=False)`, which
  shardspeed wraps: the difference between the two is shardspeed's overhead;
- deepspeed: every block through `deepspeed.checkpointing.checkpoint` (reentrant), when
  /work/dsvenv (or --ds-python) has a usable DeepSpeed.

Measured per system:
- saved bytes: the bytes autograd holds for backward after one forward, counted with an outer
  `torch.autograd.graph.saved_tensors_hooks` (unique storages, parameters excluded). DeepSpeed's
  reentrant checkpoint keeps its inputs as attributes of its autograd node, not as saved tensors,
  so the hook cannot see them: its figure is left out (n/a) and its RSS figures stand instead.
- RSS held after forward: resident memory after the forward minus before it (median over steps).
  The workers run with MALLOC_MMAP_THRESHOLD_=131072, so glibc gives large tensors their own
  mappings and returns them on free; resident memory then follows live tensors instead of the
  allocator's high-water mark. Peak RSS is the process's lifetime peak (model and data included).
  (Read before a checkpointing worker runs any unchecked step.)
- step time: seconds per forward+backward (no optimizer step: it does not depend on
  checkpointing), median over steps, then median over rounds; "time ratio" divides by plain's.
  On a shared machine that ratio drifts with the load, so each checkpointing worker also runs
  every timed step without checkpointing, alternating the order (ABBA): "paired ratio" is the
  median (over steps, then over rounds) of checkpointed / unchecked time in the same process.
The losses of the timed steps are printed: every system runs the same data from the same RNG state,
and checkpointing replays dropout masks exactly, so they must agree to the last bit (also with the
worker's own unchecked steps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
MIB = float(1 << 20)
MODEL = dict(vocab_size=8192, seq_len=256, num_layers=6, hidden_size=512, num_heads=8, dropout=0.1)
MICRO_BATCH = 8


# ---- worker: one system, one process ------------------------------------------------------------------

def _checkpoint_fn(system: str) -> Callable[..., Any] | None:
    if system == "plain":
        return None
    if system == "shardspeed":
        import shardspeed

        return shardspeed.checkpointing.checkpoint
    if system == "torch":
        import functools

        import torch.utils.checkpoint

        return functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    if system == "deepspeed":
        import deepspeed

        return deepspeed.checkpointing.checkpoint
    raise ValueError(f"unknown system {system!r}")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _saved_bytes(model: Any, forward: Callable[[], Any]) -> int:
    """Bytes of the unique non-parameter storages autograd saves during `forward()`."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    return sum(seen.values())


def worker(system: str, steps: int, warmup: int, threads: int) -> dict:
    """Saved bytes, memory and step times of `system`; for a checkpointing system also the same
    steps without checkpointing in the same process, alternating (ABBA), for a drift-free time ratio."""
    import torch
    from torch import nn

    sys.path.insert(0, str(HERE.parent))
    from examples.gpt import GPT, GPTConfig

    torch.set_num_threads(threads)
    wrap = _checkpoint_fn(system)

    class Checkpointed(nn.Module):
        enabled = True

        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return wrap(self.block, x) if Checkpointed.enabled else self.block(x)

    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL)).train()
    if wrap is not None:
        model.blocks = nn.ModuleList(Checkpointed(b) for b in model.blocks)
    data = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, MODEL["seq_len"]), generator=data)
               for _ in range(warmup + steps)]

    def step(ids: torch.Tensor, seed: int, checkpointed: bool) -> tuple[float, int, float]:
        Checkpointed.enabled = checkpointed
        for p in model.parameters():
            p.grad = None
        torch.manual_seed(seed)  # the dropout stream of this step, the same in every system and variant
        start, before = time.perf_counter(), _rss()
        loss = model(ids, ids)
        held = _rss() - before
        loss.backward()
        return time.perf_counter() - start, held, loss.item()

    torch.manual_seed(2)
    saved = _saved_bytes(model, lambda: model(batches[0], batches[0]))
    for ids in batches[1:warmup]:
        step(ids, 0, True)
    variants = [True] if wrap is None else [True, False]
    runs: dict[bool, list[tuple[float, int, float]]] = {v: [] for v in variants}
    peak = 0
    for i, ids in enumerate(batches[warmup:]):
        for checkpointed in (variants if i % 2 == 0 else variants[::-1]):
            runs[checkpointed].append(step(ids, 100 + i, checkpointed))
            if not runs.get(False):  # the lifetime peak, read before any unchecked step has raised it
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mine = runs[True]
    out = {"system": system, "saved_bytes": saved if system != "deepspeed" else None,
           "held_after_forward": statistics.median(r[1] for r in mine), "peak_rss": peak,
           "step_s": statistics.median(r[0] for r in mine), "losses": [r[2] for r in mine]}
    if wrap is not None:
        plain = runs[False]
        out["paired_ratio"] = statistics.median(c[0] / p[0] for c, p in zip(mine, plain))
        out["paired_losses_equal"] = [c[2] for c in mine] == [p[2] for p in plain]
    return out


# ---- driver ------------------------------------------------------------------------------------------

def _run(python: str, system: str, args: argparse.Namespace) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [python, str(Path(__file__).resolve()), "--worker", system, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default="plain,shardspeed,torch,deepspeed")
    parser.add_argument("--ds-python", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.threads)))
        return

    from _driver import deepspeed_python

    pythons = {s: sys.executable for s in args.systems.split(",")}
    if "deepspeed" in pythons:
        ds = deepspeed_python(args.ds_python)
        if ds is None:
            print("deepspeed: no usable DeepSpeed install; left out")
            del pythons["deepspeed"]
        else:
            pythons["deepspeed"] = ds
    results: dict[str, list[dict]] = {s: [] for s in pythons}
    for r in range(args.rounds):
        for system, python in pythons.items():
            results[system].append(_run(python, system, args))
            print(f"round {r + 1} {system}: {results[system][-1]['step_s']:.2f} s/step", flush=True)

    def med(system: str, key: str) -> float | None:
        values = [x[key] for x in results[system] if x.get(key) is not None]
        return statistics.median(values) if values else None

    base_saved, base_time = med("plain", "saved_bytes"), med("plain", "step_s")
    print(f"\nGPT {MODEL}, micro batch {MICRO_BATCH}, fp32, {args.threads} threads; medians of {args.rounds} rounds x {args.steps} steps")
    print(f"{'system':<11} {'saved MiB':>9} {'saved ratio':>11} {'held-after-fwd MiB':>18} {'peak RSS MiB':>12} {'s/step':>7} "
          f"{'time ratio':>10} {'paired ratio':>12}")
    for system in results:
        saved, step = med(system, "saved_bytes"), med(system, "step_s")
        ratio = f"{saved / base_saved:11.3f}" if saved is not None and base_saved else f"{'n/a':>11}"
        print(f"{system:<11} {_mib(saved):>9} {ratio} {_mib(med(system, 'held_after_forward')):>18} "
              f"{_mib(med(system, 'peak_rss')):>12} {step:7.2f} {step / base_time:10.3f} {_ratio(med(system, 'paired_ratio')):>12}")
    print("\nper-round s/step: " + "; ".join(f"{s}: " + ", ".join(f"{x['step_s']:.2f}" for x in results[s]) for s in results))
    print("per-round paired ratio: " + "; ".join(f"{s}: " + ", ".join(f"{x['paired_ratio']:.3f}" for x in results[s])
                                                  for s in results if s != "plain"))
    reference = results["plain"][0]["losses"] if "plain" in results else None
    for system, runs in results.items():
        same = reference is not None and all(x["losses"] == reference for x in runs)
        paired = all(x.get("paired_losses_equal", True) for x in runs)
        print(f"losses {system}: {runs[0]['losses']}" + ("  (bitwise equal to plain)" if same else "  (DIFFER from plain)")
              + ("" if paired else "  (DIFFER from its own unchecked steps)"))


if __name__ == "__main__":
    main()
