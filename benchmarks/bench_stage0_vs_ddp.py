"""Stage-0 tokens/s over torch DDP's, side by side in one run (and DeepSpeed stage 0 when installed).

    .venv/bin/python benchmarks/bench_stage0_vs_ddp.py [--rounds 5] [--world 2] [--ds-python PATH]

Model: the example GPT at 27.4M parameters (6 layers, hidden 512, seq 128, vocab 8192, untied
head), fp32, micro batch 4, one thread per rank, AdamW, clipping at 1.0, equal gradient buckets.
Target (issue 2): shardspeed / DDP >= 0.95.
"""
from __future__ import annotations

import argparse

from _driver import Run, deepspeed_python, interleave, median, python, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ds-python", default=None, help="Python of a DeepSpeed install (default: /work/dsvenv if usable).")
    a = p.parse_args()
    common = ["--steps", str(a.steps)]
    runs = [Run("torch DDP", python(), ["--system", "ddp", *common]),
            Run("shardspeed stage 0", python(), ["--system", "shardspeed", "--stage", "0", *common])]
    ds = deepspeed_python(a.ds_python)
    if ds:
        runs.append(Run("DeepSpeed 0.19.8 stage 0", ds, ["--system", "deepspeed", "--stage", "0", *common]))
    else:
        print("DeepSpeed not found: comparing with DDP only")
    print(f"world size {a.world}, {a.rounds} interleaved rounds")
    interleave(runs, a.world, a.rounds)
    print()
    print(table(runs, runs[0]))
    ratio = median(runs[1]) / median(runs[0])
    print(f"\nshardspeed stage 0 / DDP tokens/s: {ratio:.3f} (target >= 0.95)")
    if ds:
        print(f"shardspeed stage 0 / DeepSpeed stage 0: {median(runs[1]) / median(runs[2]):.3f}")


if __name__ == "__main__":
    main()
