"""RLHF rollout time under ZeRO-3 (issue 16): naive stage-3 `generate` vs the hybrid engine vs the
unsharded model, side by side in one run.

    .venv/bin/python benchmarks/bench_rollout.py [--rounds 3] [--new-tokens 64] [--batch 4]

World 2 over gloo, one thread per rank, a random GPT-2 from config (8 layers, hidden 512, vocab 8192,
~33M parameters), fp32, greedy, prompt 32 tokens, `min_new_tokens` = `max_new_tokens` so every run
makes the same number of steps. Systems, interleaved per round:
- naive: a ZeRO-3 engine (no hybrid engine) and `engine.module.generate`: every layer gathered at
  every decode step (what DeepSpeed users hit without the hybrid engine, DeepSpeedExamples#718);
- hybrid: `hybrid_engine.enabled` with `pin_parameters` (the default): `engine.generate` gathers every
  parameter once per call, then decodes with no collective;
- unsharded: the plain model's `generate` on each rank, plus the time of one full gather (what the
  hybrid engine cannot avoid), reported apart.

Targets: hybrid >= 3x faster than naive; hybrid <= 1.3x (unsharded + one gather).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _model() -> Any:
    import transformers as tf

    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=8192, n_embd=512, n_layer=8, n_head=8, n_positions=256,
                                            bos_token_id=1, eos_token_id=3, pad_token_id=0))


def _config(hybrid: bool) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "hybrid_engine": {"enabled": hybrid, "max_out_tokens": 512}}


def _worker(rank: int, world: int, store_path: str, args: argparse.Namespace, out: Any) -> None:
    import shardspeed

    torch.set_num_threads(1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"})
    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    ids = torch.randint(4, 8192, (args.batch, 32), generator=torch.Generator().manual_seed(rank))
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    plain = _model().eval()
    naive_model, hybrid_model = _model(), _model()
    naive, *_ = shardspeed.initialize(model=naive_model, model_parameters=naive_model.parameters(), config=_config(False))
    hybrid, *_ = shardspeed.initialize(model=hybrid_model, model_parameters=hybrid_model.parameters(), config=_config(True))
    naive.module.eval()
    times: dict[str, list[float]] = {"naive": [], "hybrid": [], "unsharded": [], "one_gather": []}
    with torch.no_grad():
        for round_ in range(args.rounds + 1):  # round 0 warms up
            for name in ("naive", "hybrid", "unsharded"):
                dist.barrier()
                start = time.perf_counter()
                if name == "naive":
                    tokens = naive.module.generate(ids, **kw)
                elif name == "hybrid":
                    tokens = hybrid.generate(ids, **kw)
                else:
                    tokens = plain.generate(ids, **kw)
                elapsed = time.perf_counter() - start
                if round_:
                    times[name].append(elapsed)
                    if name == "hybrid":
                        times["one_gather"].append(hybrid.gather_time)
                assert tokens.shape[1] == 32 + args.new_tokens
    if rank == 0:
        out.put({k: statistics.median(v) for k, v in times.items()})
    naive.destroy()
    hybrid.destroy()
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, 2, os.path.join(tmp, "store"), args, out)) for r in range(2)]
        for p in procs:
            p.start()
        result = out.get(timeout=3600)
        for p in procs:
            p.join(timeout=60)
    base = result["unsharded"] + result["one_gather"]
    print(f"rollout, world 2, ZeRO-3, batch {args.batch}, prompt 32, {args.new_tokens} new tokens, median of {args.rounds} rounds:")
    for name in ("naive", "hybrid", "unsharded", "one_gather"):
        print(f"  {name:<11} {result[name]:8.3f} s")
    speedup = result["naive"] / result["hybrid"]
    overhead = result["hybrid"] / base
    print(f"  hybrid vs naive: {speedup:.2f}x faster  (target >= 3x: {'PASS' if speedup >= 3 else 'FAIL'})")
    print(f"  hybrid / (unsharded + one gather): {overhead:.2f}  (target <= 1.3: {'PASS' if overhead <= 1.3 else 'FAIL'})")


if __name__ == "__main__":
    main()
