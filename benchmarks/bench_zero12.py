"""ZeRO stages 1 and 2 against torch DDP, FSDP2 and DeepSpeed, side by side in one interleaved run.

    .venv/bin/python benchmarks/bench_zero12.py [--rounds 3] [--world 2] [--steps 10] [--ds-python PATH]

Model: the example GPT at 27.4M parameters (6 layers, hidden 512, seq 128, vocab 8192, untied
head), fp32, micro batch 4, one thread per rank, AdamW, clipping at 1.0, gradient buckets of 6.5M
elements for every system that has them. shardspeed and DeepSpeed run with the same config:
`zero_optimization.stage` 1 or 2, `overlap_comm: true`, reduce/all-gather buckets of 6.5M elements.
FSDP2 is `fully_shard` on each transformer block and the root with `reshard_after_forward=False`
(parameters stay gathered from forward through backward: the closest peer to ZeRO-2), on a CPU
mesh over gloo.

Reported per system: tokens/s (median of rounds), ratio to DDP, peak RSS per rank (median over
rounds of the max over ranks), model-state bytes per parameter on the rank holding the most (what
each system counts is written in `_gpt_worker.py`), and rank 0's seconds per phase.

Targets (issue 3): shardspeed stages 1 and 2 >= 0.95x DDP tokens/s and >= 1.2x DeepSpeed's same
stage; shardspeed's model-state bytes/param equal to the ZeRO formula for fp32 with AdamW:
parameters 4 + gradients 4 (stage 1) or 4/N (stage 2) + Adam states 8/N (stage 2, N=2: 10).
"""
from __future__ import annotations

import argparse

from _driver import (Run, deepspeed_python, interleave, median, median_peak_rss, median_phase,
                     median_state_per_param, per_round, python)

SPEED_VS_DDP = 0.95
SPEED_VS_DEEPSPEED = 1.2
FORMULA_TOLERANCE = 0.01  # bytes/param: the formula ignores partition padding and optimizer step counters


def formula(system: str, stage: int, world: int) -> float:
    """fp32 + AdamW model-state bytes per parameter per rank that the design promises."""
    if system == "ddp":
        return 16.0
    if system == "fsdp2":
        return 16.0 / world  # parameters, gradients and Adam states all sharded
    grads = 4.0 if stage < 2 else 4.0 / world
    return 4.0 + grads + (8.0 / world if stage >= 1 else 8.0)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def build_runs(a: argparse.Namespace) -> list[Run]:
    common = ["--steps", str(a.steps)]
    zero = ["--overlap_comm", "1", *common]
    runs = [Run("torch DDP", python(), ["--system", "ddp", *common]),
            Run("FSDP2 (no reshard after fwd)", python(), ["--system", "fsdp2", *common]),
            Run("shardspeed stage 1", python(), ["--system", "shardspeed", "--stage", "1", *zero]),
            Run("shardspeed stage 2", python(), ["--system", "shardspeed", "--stage", "2", *zero])]
    ds = deepspeed_python(a.ds_python)
    if ds:
        runs += [Run("DeepSpeed 0.19.8 stage 1", ds, ["--system", "deepspeed", "--stage", "1", *zero]),
                 Run("DeepSpeed 0.19.8 stage 2", ds, ["--system", "deepspeed", "--stage", "2", *zero])]
    else:
        print("DeepSpeed not found: comparing with DDP and FSDP2 only")
    return runs


def system_of(run: Run) -> tuple[str, int]:
    r = run.results[0]
    return r["system"], r["stage"]


def report(runs: list[Run], world: int) -> None:
    ddp = runs[0]
    print(f"| {'run':<28} | tokens/s (median) | x DDP | peak RSS/rank MiB (median) "
          f"| model-state B/param/rank | formula | fwd / bwd / step s (rank 0) |")
    print(f"| {'-' * 28} | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        system, stage = system_of(run)
        phases = " / ".join(f"{median_phase(run, p):.2f}" for p in ("forward", "backward", "step"))
        print(f"| {run.label:<28} | {median(run):.1f} | {median(run) / median(ddp):.3f} | {median_peak_rss(run):.0f} "
              f"| {median_state_per_param(run):.2f} | {formula(system, stage, world):.2f} | {phases} |")
    print("\nPer-round tokens/s:")
    for run in runs:
        print(f"  {run.label:<28} {per_round(run)}")
    print("\nModel-state breakdown, bytes/param on rank 0 (last round):")
    for run in runs:
        last = run.results[-1]
        parts = ", ".join(f"{k} {v / last['params']:.2f}" for k, v in last["model_state_breakdown"].items())
        print(f"  {run.label:<28} {parts}")
    print("\nTargets:")
    by_key = {system_of(run): run for run in runs}
    for stage in (1, 2):
        ours = by_key[("shardspeed", stage)]
        ratio = median(ours) / median(ddp)
        print(f"  shardspeed stage {stage} / DDP tokens/s: {ratio:.3f} (target >= {SPEED_VS_DDP}) "
              f"{verdict(ratio >= SPEED_VS_DDP)}")
        peer = by_key.get(("deepspeed", stage))
        if peer is not None:
            ratio = median(ours) / median(peer)
            print(f"  shardspeed stage {stage} / DeepSpeed stage {stage} tokens/s: {ratio:.3f} "
                  f"(target >= {SPEED_VS_DEEPSPEED}) {verdict(ratio >= SPEED_VS_DEEPSPEED)}")
        got, want = median_state_per_param(ours), formula("shardspeed", stage, world)
        last = ours.results[-1]
        staging = last["model_state_breakdown"].get("gradient_buckets", 0) / last["params"]
        print(f"  shardspeed stage {stage} model-state bytes/param: {got:.2f} (formula {want:.2f}) "
              f"{verdict(abs(got - want) <= FORMULA_TOLERANCE)}; without the {staging:.2f} of "
              f"gradient_buckets (staging, bounded by the bucket size): {got - staging:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ds-python", default=None, help="Python of a DeepSpeed install (default: /work/dsvenv if usable).")
    a = p.parse_args()
    runs = build_runs(a)
    print(f"world size {a.world}, {a.rounds} interleaved rounds, {a.steps} timed steps each")
    interleave(runs, a.world, a.rounds)
    print()
    report(runs, a.world)


if __name__ == "__main__":
    main()
