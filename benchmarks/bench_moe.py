"""An MoE GPT with expert parallelism under shardspeed and under DeepSpeed 0.19.8's native MoE, side by side
in interleaved rounds.

    .venv/bin/python benchmarks/bench_moe.py [--rounds 5] [--steps 10] [--ds-python PATH]

Model (`_moe_worker.py`, the same code for both systems; only `MoE` and `initialize` are imported from
one or the other): 4 layers, hidden 256, 4 heads, seq 128, vocab 8192, untied head; every block's MLP is
`MoE(num_experts=8, ep_size=2, k=2, capacity_factor=1.25, eval_capacity_factor=1.25, min_capacity=4)`
over a Linear-GELU-Linear expert (hidden -> 4 x hidden -> hidden). Loss: cross-entropy + 0.01 x the
layers' summed l_aux. World 2 over gloo, one thread per rank, fp32, micro batch 4, random token ids
(fixed seed per rank), ZeRO-2, AdamW from the config (lr 1e-4, weight decay 0.01), clipping 1.0.
`initialize(model=, model_parameters=model.parameters(), config=)`: both build the dense and `ep_size_2`
param groups themselves. Both start from the same weights (see the worker's docstring).

Reported per system: tokens/s (median over rounds of 10 timed steps after 3 warm-up steps), peak RSS
per rank (median over rounds of the larger rank), expert optimizer-state bytes per rank (the torch
optimizer's states for the `ep_size_2` group's partition) against the formula, the first step's
loss on each rank, and rank 0's seconds per phase.

Targets (issue 14): shardspeed tokens/s >= 1.2x DeepSpeed's; shardspeed peak RSS per rank <= DeepSpeed's;
expert optimizer bytes per rank within 5% of (num_experts / ep_size) x layers x expert numel
x 2 Adam moments x 4 bytes / (world / ep_size).
"""
from __future__ import annotations

import argparse
import statistics

from _driver import Run, deepspeed_python, interleave, median, median_peak_rss, median_phase, per_round, python

WORKER = "_moe_worker.py"
WORLD = 2
MODEL = dict(layers=4, hidden=256, experts=8, ep=2)
SPEED_VS_DEEPSPEED = 1.2
FORMULA_TOLERANCE = 0.05  # relative: ZeRO pads each group's flat buffer to a multiple of the partition count


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def expert_formula_bytes(world: int) -> int:
    """Adam's two fp32 moments for this rank's share of the expert parameters."""
    h = MODEL["hidden"]
    expert_numel = (h * 4 * h + 4 * h) + (4 * h * h + h)
    per_rank = MODEL["experts"] // MODEL["ep"] * MODEL["layers"] * expert_numel
    return per_rank * 2 * 4 // (world // MODEL["ep"])


def median_expert_bytes(run: Run) -> float:
    return statistics.median(max(r["expert_optimizer_bytes"]) for r in run.results)


def report(peer: Run, ours: Run) -> None:
    want = expert_formula_bytes(WORLD)
    print("| run | tokens/s (median) | x DeepSpeed | peak RSS/rank MiB (median) | expert optimizer MB/rank | "
          "formula MB | first-step loss (rank 0, rank 1) | fwd (MoE fwd) / bwd / step s (rank 0) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    for run in (peer, ours):
        first = ", ".join(f"{v:.6f}" for v in run.results[0]["first_loss"])
        phases = (f"{median_phase(run, 'forward'):.3f} ({median_phase(run, 'moe_forward'):.3f}) / "
                  f"{median_phase(run, 'backward'):.3f} / {median_phase(run, 'step'):.3f}")
        print(f"| {run.label} | {median(run):.1f} | {median(run) / median(peer):.3f} | {median_peak_rss(run):.0f} "
              f"| {median_expert_bytes(run) / 1e6:.2f} | {want / 1e6:.2f} | {first} | {phases} |")
    print("\nPer-round tokens/s:")
    for run in (peer, ours):
        print(f"  {run.label:<34} {per_round(run)}")
    print(f"\nparam groups with \"moe\": True: shardspeed {ours.results[0]['moe_groups']}, "
          f"DeepSpeed {peer.results[0]['moe_groups']}; DeepSpeed's inner optimizer: {peer.results[0]['optimizer']}, "
          f"shardspeed's: {ours.results[0]['optimizer']}")
    losses = zip(peer.results[0]["first_loss"], ours.results[0]["first_loss"])
    print("first-step loss |shardspeed - DeepSpeed| per rank: " + ", ".join(f"{abs(a - b):.2e}" for a, b in losses))
    print("\nTargets:")
    speed = median(ours) / median(peer)
    print(f"  tokens/s shardspeed / DeepSpeed: {speed:.3f} (target >= {SPEED_VS_DEEPSPEED}) "
          f"{verdict(speed >= SPEED_VS_DEEPSPEED)}")
    rss = median_peak_rss(ours) / median_peak_rss(peer)
    print(f"  peak RSS per rank shardspeed / DeepSpeed: {rss:.3f} (target <= 1.0) {verdict(rss <= 1.0)}")
    for run in (ours, peer):
        rel = median_expert_bytes(run) / want
        print(f"  {run.label} expert optimizer bytes / formula: {rel:.4f} (target within {FORMULA_TOLERANCE:.0%}) "
              f"{verdict(abs(rel - 1) <= FORMULA_TOLERANCE)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("rounds", 5), ("steps", 10), ("warmup", 3)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--ds-python", default=None, help="Python of a DeepSpeed install (default: /work/dsvenv if usable).")
    a = p.parse_args()
    ds = deepspeed_python(a.ds_python)
    if ds is None:
        raise SystemExit("no usable DeepSpeed install (pass --ds-python): this benchmark compares against it")
    common = ["--steps", str(a.steps), "--warmup", str(a.warmup), *(f"--{k}={v}" for k, v in MODEL.items())]
    peer = Run("DeepSpeed 0.19.8 MoE, ZeRO-2", ds, ["--system", "deepspeed", *common])
    ours = Run("shardspeed MoE, ZeRO-2", python(), ["--system", "shardspeed", *common])
    print(f"world {WORLD}, ep_size {MODEL['ep']}, {a.rounds} interleaved rounds, {a.warmup} warm-up + {a.steps} "
          "timed steps each")
    interleave([peer, ours], WORLD, a.rounds, WORKER)
    print()
    report(peer, ours)


if __name__ == "__main__":
    main()
