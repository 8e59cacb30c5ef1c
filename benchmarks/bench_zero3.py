"""ZeRO stage 3 against torch DDP, FSDP2 and DeepSpeed, side by side in interleaved rounds, at
one or more world sizes.

    .venv/bin/python benchmarks/bench_zero3.py [--rounds 3] [--world 2 4] [--steps 10] [--warmup 3] [--ds-python PATH]

Model: the example GPT at 27.4M parameters (6 layers, hidden 512, seq 128, vocab 8192, untied
head), fp32, micro batch 4, one thread per rank, AdamW, clipping at 1.0, as in bench_zero12.py.

Systems:
- torch DDP (the baseline), gradient buckets of 6.5M elements;
- FSDP2: `fully_shard` on each transformer block and the root with its default resharding
  (`reshard_after_forward=True`: each block's parameters are freed after its forward and gathered
  again in backward), on a CPU mesh over gloo;
- shardspeed stage 3 with DeepSpeed's default stage-3 knobs: `zero_optimization: {stage: 3,
  overlap_comm: true}` plus bench_zero12's `reduce_bucket_size` = `allgather_bucket_size` = 6.5M
  elements (DeepSpeed's stage 3 uses the first and ignores the second; shardspeed's stage 3
  reduces gradients unit by unit and uses neither). Everything else is the default: prefetch
  bucket 50M elements, persistence threshold 100k, max live parameters and max reuse distance 1e9,
  so in practice the whole model stays gathered from forward through backward;
- shardspeed stage 3 "memory-capped": the same plus `stage3_max_live_parameters` =
  `stage3_max_reuse_distance` = the elements of two transformer blocks (computed from the model
  config and printed), so that about two blocks' worth of parameters are gathered at once;
- DeepSpeed 0.19.8 stage 3 with the same config as shardspeed's default, when /work/dsvenv (or
  --ds-python) has a usable DeepSpeed.

Reported per world size and system: tokens/s (median of rounds), ratio to DDP, peak RSS per rank
(median over rounds of the max over ranks), model-state bytes per parameter on the rank holding
the most (median over rounds) against the fp32 + AdamW formula 16/N (DDP: 16), the live gathered
parameters at peak (shardspeed; its cap), and rank 0's seconds per phase. What is counted as
model state (measured between one more backward and its step; `_gpt_worker.py` has the details):
- shardspeed: parameters + persistent_parameters + gradients + master_weights + optimizer_states
  of `engine.memory_breakdown()`; gathered_parameters_peak is "live gathered", and
  gradient_buckets_peak (reduce staging) is shown apart;
- DeepSpeed: partitions of the parameters, whole persistent parameters, gradient partitions,
  the fp32 partition it steps (a copy even for an fp32 model) and the optimizer states; its IPG
  bucket buffer (`reduce_bucket_size` elements, kept) is shown apart as staging;
- FSDP2: local shards of parameters, gradients and optimizer states;
- DDP: parameters, .grad and optimizer states (its reducer's buckets are not counted).

Targets (shardspeed stage 3, both variants, at every world size): tokens/s >= 1.2x FSDP2 and
>= 1.2x DeepSpeed stage 3; model states within 5 % of 16/N bytes/param, with the live gathered
parameters within the configured cap; peak RSS per rank <= DDP's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from _driver import MODEL, Run, deepspeed_python, gpt_config, interleave, median, median_peak_rss, median_phase, per_round, python

SPEED_VS_PEER = 1.2
STATE_TOLERANCE = 0.05  # relative, against 16/N
ENGINE_STATE_KEYS = ("parameters", "persistent_parameters", "gradients", "master_weights", "optimizer_states")
STATE_KEYS = {
    "ddp": ("parameters", "gradients", "optimizer_states"),
    "fsdp2": ("parameters", "gradients", "optimizer_states"),
    "shardspeed": ENGINE_STATE_KEYS,
    "deepspeed": ENGINE_STATE_KEYS,
}
# Peak bytes of gathered (unsharded) parameters: only shardspeed tracks it. DeepSpeed's breakdown has
# `gathered_parameters`, what is still gathered at the measuring point (after backward), not a peak.
LIVE_KEY = {"shardspeed": "gathered_parameters_peak"}
STAGING_KEY = {"shardspeed": "gradient_buckets_peak", "deepspeed": "gradient_buckets"}

def block_numel() -> int:
    """Elements of one transformer block of the benchmark model, counted from the model itself."""
    cfg = gpt_config()
    from gpt import Block

    return sum(p.numel() for p in Block(cfg).parameters())


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def formula(system: str, world: int) -> float:
    """fp32 + AdamW model-state bytes per parameter per rank: parameters 4 + gradients 4 + Adam 8,
    all divided by N once sharded (DDP replicates everything)."""
    return 16.0 if system == "ddp" else 16.0 / world


def build_runs(a: argparse.Namespace, cap: int, ds: str | None) -> list[Run]:
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    zero = ["--stage", "3", "--overlap_comm", "1", *common]
    runs = [Run("torch DDP", python(), ["--system", "ddp", *common]),
            Run("FSDP2 (reshard after fwd)", python(), ["--system", "fsdp2", "--reshard_after_forward", "1", *common]),
            Run("shardspeed stage 3", python(), ["--system", "shardspeed", *zero]),
            Run("shardspeed stage 3 capped", python(),
                ["--system", "shardspeed", *zero, "--max_live", str(cap), "--max_reuse", str(cap)])]
    if ds:
        runs.append(Run("DeepSpeed 0.19.8 stage 3", ds, ["--system", "deepspeed", *zero]))
    return runs


def rank_sum(breakdown: dict, keys: tuple[str, ...]) -> int:
    return sum(breakdown.get(k, 0) for k in keys)


def per_param(run: Run, keys: tuple[str, ...]) -> float:
    """Median over rounds of the max over ranks of the bytes under `keys`, per model parameter."""
    return statistics.median(max(rank_sum(b, keys) for b in r["model_state_breakdown_ranks"]) / r["params"]
                             for r in run.results)


def state_per_param(run: Run) -> float:
    return per_param(run, STATE_KEYS[run.results[0]["system"]])


def key_per_param(run: Run, table: dict[str, str]) -> float | None:
    key = table.get(run.results[0]["system"])
    return None if key is None else per_param(run, (key,))


def cap_of(run: Run) -> int | None:
    args = run.args
    return int(args[args.index("--max_live") + 1]) if "--max_live" in args else None


def paired(ours: Run, peer: Run) -> str:
    """Round-by-round ratios (each pair ran back to back, so under similar load)."""
    return ", ".join(f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}" for a, b in zip(ours.results, peer.results))


def report(runs: list[Run], world: int) -> list[tuple[str, bool]]:
    """Print the table for one world size; return (target, met) pairs."""
    ddp = runs[0]
    params = ddp.results[0]["params"]
    print(f"| {'run':<27} | tokens/s (median) | x DDP | peak RSS/rank MiB (median) | model-state B/param/rank "
          f"| formula 16/N | live gathered B/param (cap) | staging B/param | fwd / bwd / step s (rank 0) |")
    print(f"| {'-' * 27} | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for run in runs:
        system = run.results[0]["system"]
        phases = " / ".join(f"{median_phase(run, p):.2f}" for p in ("forward", "backward", "step"))
        live = key_per_param(run, LIVE_KEY)
        cap = cap_of(run)
        live_s = "-" if live is None else f"{live:.2f}"
        if system == "shardspeed":
            live_s += f" ({cap * 4 / params:.2f})" if cap else " (no cap)"
        staging = key_per_param(run, STAGING_KEY)
        staging_s = "-" if staging is None else f"{staging:.2f}"
        print(f"| {run.label:<27} | {median(run):.1f} | {median(run) / median(ddp):.3f} | {median_peak_rss(run):.0f} "
              f"| {state_per_param(run):.2f} | {formula(system, world):.2f} | {live_s} | {staging_s} | {phases} |")
    print("\nPer-round tokens/s:")
    for run in runs:
        print(f"  {run.label:<27} {per_round(run)}")
    print("\nModel-state breakdown, bytes/param on rank 0 (last round):")
    for run in runs:
        last = run.results[-1]
        parts = ", ".join(f"{k} {v / last['params']:.2f}" for k, v in last["model_state_breakdown"].items())
        print(f"  {run.label:<27} {parts}")

    fsdp = runs[1]
    ds = runs[4] if len(runs) > 4 else None
    rss_ddp = median_peak_rss(ddp)
    results: list[tuple[str, bool]] = []
    print(f"\nTargets, world size {world}:")
    for ours in runs[2:4]:
        name = ours.label
        ratio = median(ours) / median(fsdp)
        ok = ratio >= SPEED_VS_PEER
        results.append((f"{name} / FSDP2 tokens/s >= {SPEED_VS_PEER} (N={world})", ok))
        print(f"  {name} / FSDP2 tokens/s: {ratio:.3f} (target >= {SPEED_VS_PEER}) {verdict(ok)}; "
              f"per round {paired(ours, fsdp)}")
        if ds is not None:
            ratio = median(ours) / median(ds)
            ok = ratio >= SPEED_VS_PEER
            results.append((f"{name} / DeepSpeed stage 3 tokens/s >= {SPEED_VS_PEER} (N={world})", ok))
            print(f"  {name} / DeepSpeed stage 3 tokens/s: {ratio:.3f} (target >= {SPEED_VS_PEER}) {verdict(ok)}; "
                  f"per round {paired(ours, ds)}")
        got, want = state_per_param(ours), formula("shardspeed", world)
        ok = abs(got - want) <= STATE_TOLERANCE * want
        results.append((f"{name} model states within 5% of 16/N (N={world})", ok))
        print(f"  {name} model-state bytes/param: {got:.3f} (16/N = {want:.2f}, +-5 %: "
              f"{want * (1 - STATE_TOLERANCE):.2f}..{want * (1 + STATE_TOLERANCE):.2f}) {verdict(ok)}")
        live = key_per_param(ours, LIVE_KEY)
        cap = cap_of(ours)
        if cap:
            limit = cap * 4 / params
            ok = live <= limit
            results.append((f"{name} live gathered <= cap (N={world})", ok))
            print(f"  {name} live gathered at peak: {live:.3f} B/param (cap {cap:,} elements = {limit:.3f} B/param) "
                  f"{verdict(ok)}")
        else:
            print(f"  {name} live gathered at peak: {live:.3f} B/param (no cap: DeepSpeed's default 1e9 elements; "
                  f"16/N + live = {got + live:.2f})")
        rss = median_peak_rss(ours)
        ok = rss <= rss_ddp
        results.append((f"{name} peak RSS/rank <= DDP's (N={world})", ok))
        print(f"  {name} peak RSS/rank: {rss:.0f} MiB vs DDP {rss_ddp:.0f} MiB {verdict(ok)}")
    return results


def load() -> str:
    """The machine's 1/5/15-minute load averages: other work on this 2-core box skews the absolute numbers."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--world", type=int, nargs="+", default=[2, 4])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (stage 3 records its fetch order on the first).")
    p.add_argument("--ds-python", default=None, help="Python of a DeepSpeed install (default: /work/dsvenv if usable).")
    a = p.parse_args()
    if a.warmup < 2:
        p.error("--warmup must be at least 2: stage 3 records its prefetch schedule on the first step")
    block = block_numel()
    cap = 2 * block
    print(f"memory cap: 2 transformer blocks x {block:,} elements (12h^2 + 13h, h={MODEL['hidden']}) = "
          f"{cap:,} elements = {cap * 4 / 2**20:.1f} MiB fp32 -> stage3_max_live_parameters = "
          f"stage3_max_reuse_distance = {cap}")
    ds = deepspeed_python(a.ds_python)
    if not ds:
        print("DeepSpeed not found: comparing with DDP and FSDP2 only")
    started = time.time()
    summary: list[tuple[str, bool]] = []
    for world in a.world:
        runs = build_runs(a, cap, ds)
        print(f"\n=== world size {world}: {a.rounds} interleaved rounds, {a.warmup} warm-up + {a.steps} timed steps each "
              f"(load average before: {load()}) ===")
        interleave(runs, world, a.rounds)
        print(f"(load average after: {load()})\n")
        summary += report(runs, world)
    print(f"\nSummary ({time.time() - started:.0f} s):")
    for name, ok in summary:
        print(f"  {verdict(ok):<6} {name}")


if __name__ == "__main__":
    main()
