"""Tensor parallel step time against the unsharded model: AutoTP (tensor_parallel.autotp_size 2)
next to the same Hugging Face model trained unsharded, in interleaved rounds.

    .venv/bin/python benchmarks/bench_tensor_parallel.py [--rounds 3] [--steps 6] [--warmup 2]
        [--models gpt2] [--json PATH]

Models (random weights, dropout 0, fp32, eager attention), micro batch 4, sequence 128, vocab 8192:
- gpt2: transformers.GPT2Config, n_embd 512, n_layer 6, n_head 8 (tied embeddings), n_positions 128;
- llama (optional, `--models gpt2 llama`): LlamaConfig, hidden 512, 4 layers, 8 heads (8 KV heads),
  intermediate 1344, untied LM head.

Systems, each launched through torchrun (benchmarks/_tp_worker.py), interleaved A, B, C, A, B, C:
- unsharded-1t: world 1, the shardspeed engine (ZeRO stage 0), one thread;
- unsharded-2t: world 1, two threads (torch.set_num_threads(2)): the same cores as tp=2;
- tp2-1t: world 2, tensor_parallel.autotp_size 2 (data parallel size 1), one thread per rank.
All three train the same global batch (one micro batch of 4) with AdamW (lr 1e-3, gradient clipping 1.0)
on the same batches from the same initial weights, so their loss trajectories agree up to summation order.

Reported per system: median seconds per step (median over steps in a round, then over rounds),
tokens/s from it, parameter bytes on rank 0 (sum of numel * element_size over engine.module's
parameters), rank 0's CPU seconds per wall second in the timed steps (how many cores it really got:
on a shared machine two threads may get one), peak RSS per rank (ru_maxrss, median over rounds of the larger rank), the final loss and
the largest relative difference of the loss trajectory from unsharded-1t. For tp2, also the seconds
per step spent in torch.distributed all_reduce / all_gather by phase (rank 0; a call's time includes
waiting for the other rank).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _driver import Run, python, run_once  # noqa: E402

MODELS = {
    "gpt2": dict(layers=6, hidden=512, heads=8, vocab=8192, seq=128, micro=4),
    "llama": dict(layers=4, hidden=512, heads=8, vocab=8192, seq=128, micro=4),
}
SYSTEMS = [("unsharded-1t", 1, 1, 1), ("unsharded-2t", 1, 1, 2), ("tp2-1t", 2, 2, 1)]  # label, world, tp, threads
MIB = float(1 << 20)


def med(run: Run, key: str) -> float:
    return statistics.median(r[key] for r in run.results)


def max_rel_loss_diff(run: Run, base: Run) -> float:
    """Largest |loss - base loss| / |base loss| over every step of every round."""
    worst = 0.0
    for mine, theirs in zip(run.results, base.results):
        for a, b in zip(mine["losses"], theirs["losses"]):
            worst = max(worst, abs(a - b) / abs(b))
    return worst


def report(model: str, runs: list[Run]) -> dict:
    base, same_cores, tp = runs
    print(f"\n{model}: {runs[0].results[0]['params'] / 1e6:.2f} M parameters, {MODELS[model]}")
    print(f"| system | world | step s (median) | tokens/s | CPU/wall rank 0 | param MiB rank 0 | peak RSS MiB/rank | final loss | "
          f"max rel loss diff vs {base.label} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary: dict = {}
    for run in runs:
        step = med(run, "median_step_s")
        rss = statistics.median(max(r["peak_rss_mib"]) for r in run.results)
        param_mib = run.results[0]["param_bytes"][0] / MIB
        final = statistics.median(r["final_loss"] for r in run.results)
        diff = max_rel_loss_diff(run, base)
        world = run.results[0]["world"]
        print(f"| {run.label} | {world} | {step:.3f} | {med(run, 'tokens_per_s'):.0f} | {med(run, 'cpu_per_wall'):.2f} | "
              f"{param_mib:.1f} | {rss:.0f} | {final:.7f} | {diff:.1e} |")
        summary[run.label] = {"step_s": step, "cpu_per_wall": med(run, "cpu_per_wall"), "tokens_per_s": med(run, "tokens_per_s"),
                              "param_bytes_rank0": run.results[0]["param_bytes"][0], "peak_rss_mib": rss,
                              "final_loss": final, "max_rel_loss_diff": diff,
                              "rounds_step_s": [r["median_step_s"] for r in run.results]}
    for run in runs:
        print(f"  {run.label:<13} step s per round: " + ", ".join(f"{r['median_step_s']:.3f}" for r in run.results))
    t_tp, t_1, t_2 = (summary[r.label]["step_s"] for r in (tp, base, same_cores))
    p_ratio = summary[tp.label]["param_bytes_rank0"] / summary[base.label]["param_bytes_rank0"]
    rss_ratio = summary[tp.label]["peak_rss_mib"] / summary[base.label]["peak_rss_mib"]
    print(f"ratios: tp2 step / unsharded-1t step = {t_tp / t_1:.3f};  tp2 step / unsharded-2t step = {t_tp / t_2:.3f}; "
          f"unsharded-2t / unsharded-1t = {t_2 / t_1:.3f}")
    print(f"        param bytes per rank tp2 / unsharded = {p_ratio:.3f};  peak RSS per rank tp2 / unsharded-1t = {rss_ratio:.3f}")
    phase = {k: statistics.median(r["phase_s"][k] for r in tp.results) for k in ("forward", "backward", "step")}
    comm = {k: statistics.median(r["comm_s"][k] for r in tp.results) for k in ("forward", "backward", "step")}
    calls = tp.results[0]["comm_calls"]
    fb_comm, fb_calls = comm["forward"] + comm["backward"], calls["forward"] + calls["backward"]
    # Outside the blocks: the embedding's forward all-reduce, the loss's two small all-reduces and the
    # LM head input's backward all-reduce; the rest belong to the blocks (GPT-2: 2 forward + 2 backward
    # each; Llama: 2 forward + 5 backward, one per column-parallel q/k/v/gate/up input).
    per_block_calls = (fb_calls - 4) / MODELS[model]["layers"]
    print(f"tp2 collectives per step (rank 0, median): forward {calls['forward']} calls {comm['forward']:.3f} s of "
          f"{phase['forward']:.3f} s; backward {calls['backward']} calls {comm['backward']:.3f} s of {phase['backward']:.3f} s; "
          f"step {calls['step']} calls {comm['step']:.3f} s of {phase['step']:.3f} s")
    print(f"        forward+backward collectives: {fb_comm:.3f} s per step = {fb_comm / t_tp:.1%} of the step, "
          f"{fb_comm / fb_calls * 1000:.1f} ms per call; per block ({per_block_calls:g} all-reduces of "
          f"{MODELS[model]['micro'] * MODELS[model]['seq'] * MODELS[model]['hidden'] * 4 / MIB:.2f} MiB) "
          f"about {fb_comm / fb_calls * per_block_calls * 1000:.0f} ms")
    summary["ratios"] = {"tp2_over_unsharded_1t": t_tp / t_1, "tp2_over_unsharded_2t": t_tp / t_2,
                         "param_bytes_tp2_over_unsharded": p_ratio, "peak_rss_tp2_over_unsharded_1t": rss_ratio}
    summary["tp2_comm"] = {"phase_s": phase, "comm_s": comm, "calls": calls, "per_block_calls": per_block_calls}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="Timed steps per run.")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["gpt2"])
    parser.add_argument("--json", default=None, help="Also write every round's results here.")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, gloo; rounds={args.rounds} steps={args.steps} "
          f"warmup={args.warmup}", flush=True)
    out: dict = {}
    for model in args.models:
        cfg = MODELS[model]
        runs = []
        for label, world, tp, threads in SYSTEMS:
            worker_args = [f"--model={model}", f"--tp={tp}", f"--threads={threads}", f"--steps={args.steps}",
                           f"--warmup={args.warmup}", *(f"--{k}={v}" for k, v in cfg.items())]
            runs.append((Run(label, python(), worker_args), world))
        for r in range(args.rounds):
            for run, world in runs:
                result = run_once(run, world, worker="_tp_worker.py")
                run.results.append(result)
                result["loadavg_1m_after"] = os.getloadavg()[0]
                print(f"  {model} round {r + 1} {run.label:<13} step {result['median_step_s']:.3f} s  "
                      f"CPU/wall {result['cpu_per_wall']:.2f}  load {result['loadavg_1m_after']:.1f}  "
                      f"{result['tokens_per_s']:6.0f} tokens/s  peak RSS {max(result['peak_rss_mib']):6.0f} MiB  "
                      f"final loss {result['final_loss']:.7f}", flush=True)
        out[model] = {"summary": report(model, [run for run, _ in runs]),
                      "rounds": {run.label: run.results for run, _ in runs}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
