"""The guide's §12.1 fine-tuning run (Hugging Face Trainer + LoRA + ZeRO-2 with CPU optimizer offload,
ds_zero2_config.json as written) at world 2: shardspeed (through the `deepspeed` alias) against real
DeepSpeed 0.19.8, the same script in two environments, side by side in interleaved rounds.

    .venv/bin/python benchmarks/bench_hf_lora.py [--rounds 3] [--steps 8] [--max_length 128] [--ds-python PATH]

The script is examples/hf/train_llama_lora.py unchanged (tiny random Llama, 4 layers, hidden 128; LoRA
r=16 on q/k/v/o; batch 4 x accumulation 8 per rank, sequences padded to --max_length), run by
`_hf_lora_worker.py`. tokens/s: rank 0's optimizer steps after the first (start-up excluded), padded
tokens of both ranks. Peak RSS: each rank's ru_maxrss, the larger of the two reported.
The DeepSpeed environment needs transformers 5.25.0, accelerate 1.16.0 and peft 0.21.2 next to it
(`/work/dsvenv/bin/pip install transformers==5.25.0 accelerate==1.16.0 peft==0.21.2`).

Targets: shardspeed tokens/s >= 1.0 x DeepSpeed's, and a lower peak RSS per rank.
"""
from __future__ import annotations

import argparse

from _driver import Run, deepspeed_python, interleave, median, median_peak_rss, per_round, python, table

WORKER = "_hf_lora_worker.py"
WORLD = 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--ds-python", default=None)
    a = p.parse_args()
    ds = deepspeed_python(a.ds_python)
    if ds is None:
        raise SystemExit("no usable DeepSpeed install (pass --ds-python): this benchmark compares against it")
    common = ["--max_steps", str(a.steps), "--max_length", str(a.max_length), "--output_dir", "benchmarks/out/hf_lora"]
    shard = Run("shardspeed ZeRO-2 + offload", python(), common)
    peer = Run("DeepSpeed 0.19.8 ZeRO-2 + offload", ds, common)
    print(f"world {WORLD}, {a.steps} optimizer steps per run, sequences of {a.max_length} tokens, {a.rounds} rounds")
    interleave([peer, shard], WORLD, a.rounds, WORKER)
    print()
    print(table([peer, shard], baseline=peer))
    print()
    for run in (peer, shard):
        print(f"{run.label}: tokens/s per round {per_round(run)}")
    speed = median(shard) / median(peer)
    rss = median_peak_rss(shard) / median_peak_rss(peer)
    print(f"\nshardspeed / DeepSpeed: tokens/s {speed:.3f}x (target >= 1.0: {'MET' if speed >= 1.0 else 'MISSED'}), "
          f"peak RSS per rank {rss:.3f}x (target < 1.0: {'MET' if rss < 1.0 else 'MISSED'})")


if __name__ == "__main__":
    main()
