"""Host overhead of ZeRO stage 3: shardspeed against torch DDP, FSDP2 and DeepSpeed, side by side
in interleaved rounds, on a model where compute is negligible.

    .venv/bin/python benchmarks/bench_zero3_host.py [--rounds 3] [--steps 30] [--warmup 5] [--micro 8] [--ds-python PATH]

Model: 48 x (Linear(64, 64), Tanh), 200k parameters, fp32, input [micro, 64] (fixed seed), loss
output.pow(2).mean(); AdamW (lr 1e-3), gradient clipping 1.0 for every system; world size 2, one
thread per rank. A step's arithmetic takes well under a millisecond here, so ms/step measures what
each system does around it: module hooks, parameter gathering and release, gradient reduction,
the optimizer step's bookkeeping, and the latency of every collective it issues. Why: with many
small layers (or a fast accelerator) this overhead, not the math, bounds stage 3's speed.

Systems (`_host_worker.py` builds them):
- torch DDP, the baseline (gradients replicated, one bucketed all-reduce);
- FSDP2: `fully_shard` on every Linear and on the root, default `reshard_after_forward=True`,
  CPU mesh over gloo, `torch.nn.utils.clip_grad_norm_` on its DTensor gradients;
- shardspeed stage 3 and DeepSpeed 0.19.8 stage 3 (when --ds-python or /work/dsvenv has a usable
  install), both with `zero_optimization: {stage: 3, stage3_param_persistence_threshold: 0}` (every
  parameter partitioned), everything else default; `loss = engine(x); engine.backward(loss); engine.step()`.

Reported per system: ms/step (median over rounds of each round's mean over the timed steps), the
per-round figures, rank 0's calls per step to torch.distributed's collective functions during the
timed steps, and the collective ops per step the profiler sees (these include collectives issued
from C++, which the Python wrappers miss: DDP's gradient all-reduce). The shardspeed that is
measured is the one next to this script (its worktree root leads PYTHONPATH), so a copy of the two
files in an older checkout measures that checkout; the library path is printed.

Targets: shardspeed ms/step <= FSDP2's, and <= 0.8 x DeepSpeed's.

`--profile PATH`: after the rounds, one more shardspeed run whose timed steps rank 0 runs under
cProfile, stats dumped to PATH (`python -m pstats PATH`); its timing is not in the table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from _driver import Run, deepspeed_python, python, run_once

WORKER = "_host_worker.py"
WORLD = 2
VS_FSDP2 = 1.0  # shardspeed ms/step at most this times FSDP2's
VS_DEEPSPEED = 0.8  # ... and at most this times DeepSpeed's


def build_runs(a: argparse.Namespace, ds: str | None) -> list[Run]:
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), "--micro", str(a.micro)]
    runs = [Run("torch DDP", python(), ["--system", "ddp", *common]),
            Run("FSDP2", python(), ["--system", "fsdp2", *common]),
            Run("shardspeed stage 3", python(), ["--system", "shardspeed", *common])]
    if ds:
        runs.append(Run("DeepSpeed 0.19.8 stage 3", ds, ["--system", "deepspeed", *common]))
    return runs


def ms(run: Run) -> float:
    return statistics.median(r["ms_per_step"] for r in run.results)


def per_round(run: Run) -> str:
    return ", ".join(f"{r['ms_per_step']:.2f}" for r in run.results)


def calls(counts: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in counts.items()) or "none"


def paired(ours: Run, peer: Run) -> str:
    """Round-by-round ratios (each pair ran back to back, so under similar load)."""
    return ", ".join(f"{a['ms_per_step'] / b['ms_per_step']:.2f}" for a, b in zip(ours.results, peer.results))


def report(runs: list[Run]) -> list[tuple[str, bool]]:
    fsdp = runs[1]
    # Same data, initial weights and optimizer everywhere, so the final losses agree closely: a
    # system that skipped work would show here.
    print(f"| {'system':<24} | ms/step (median) | x FSDP2 | collective calls/step (rank 0) | c10d ops/step (profiler) "
          f"| final loss (rank 0) |")
    print(f"| {'-' * 24} | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        last = run.results[-1]
        print(f"| {run.label:<24} | {ms(run):.2f} | {ms(run) / ms(fsdp):.3f} | {sum(last['collectives'].values()):g} "
              f"| {sum(last['c10d_ops'].values()):g} | {last['final_loss']:.8f} |")
    print("\nPer round ms/step, and what rank 0 issued per timed step (last round):")
    for run in runs:
        last = run.results[-1]
        print(f"  {run.label:<24} {per_round(run)} ms/step")
        print(f"  {'':<24} torch.distributed calls: {calls(last['collectives'])}")
        print(f"  {'':<24} profiler c10d ops:       {calls(last['c10d_ops'])}")
        if "library" in last:
            print(f"  {'':<24} library: {last['library']} ({last['version']})")
        if not last["collectives"] and not last["c10d_ops"]:
            print(f"  {'':<24} WARNING: no collectives counted")
    ours = runs[2]
    targets = [(f"shardspeed ms/step <= {VS_FSDP2:g} x FSDP2's", fsdp, VS_FSDP2)]
    if len(runs) > 3:
        targets.append((f"shardspeed ms/step <= {VS_DEEPSPEED:g} x DeepSpeed's", runs[3], VS_DEEPSPEED))
    print("\nTargets:")
    results = []
    for name, peer, factor in targets:
        ratio = ms(ours) / ms(peer)
        ok = ratio <= factor
        results.append((name, ok))
        print(f"  {'MET' if ok else 'MISSED':<6} {name}: {ms(ours):.2f} vs {ms(peer):.2f} ms, ratio {ratio:.3f} "
              f"(per round {paired(ours, peer)})")
    if len(runs) <= 3:
        print("  (DeepSpeed target not checked: no usable DeepSpeed)")
    return results


def load() -> str:
    """The 1/5/15-minute load averages: other work on this 2-core box skews the absolute numbers."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="Untimed steps first (stage 3 records its fetch order on the first).")
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--ds-python", default=None, help="Python of a DeepSpeed install (default: /work/dsvenv if usable).")
    p.add_argument("--profile", default=None, metavar="PATH", help="cProfile one extra shardspeed run's timed steps (rank 0) to PATH.")
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be at least 1")
    if a.warmup < 2:
        p.error("--warmup must be at least 2: stage 3 records its prefetch schedule on the first step")
    ds = deepspeed_python(a.ds_python)
    if not ds:
        print("DeepSpeed not found: comparing with DDP and FSDP2 only")
    runs = build_runs(a, ds)
    started = time.time()
    print(f"world size {WORLD}, micro batch {a.micro}: {a.rounds} interleaved rounds, {a.warmup} warm-up + "
          f"{a.steps} timed steps each (load average before: {load()})")
    for r in range(a.rounds):
        for run in runs:
            run.results.append(run_once(run, WORLD, WORKER))
            print(f"  round {r + 1} {run.label:<24} {run.results[-1]['ms_per_step']:8.2f} ms/step", flush=True)
    print(f"(load average after: {load()})\n")
    results = report(runs)
    if a.profile:
        path = os.path.abspath(a.profile)
        run_once(Run("shardspeed (cProfile)", python(), [*runs[2].args, "--profile", path]), WORLD, WORKER)
        print(f"\ncProfile stats of rank 0's {a.steps} timed shardspeed steps: {path} (python -m pstats {path})")
    print(f"\nSummary ({time.time() - started:.0f} s):")
    for name, ok in results:
        print(f"  {'MET' if ok else 'MISSED':<6} {name}")


if __name__ == "__main__":
    main()
