"""One rank of a side-by-side training benchmark: the same GPT, data and optimizer under
torch DDP, shardspeed or DeepSpeed, timed after a warm-up. Started by a benchmark driver through
torchrun; rank 0 prints one JSON line with tokens/s and the peak resident memory of every rank.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from gpt import GPT, GPTConfig  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--system", choices=["ddp", "shardspeed", "deepspeed"], required=True)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bucket", type=float, default=6.5e6, help="Gradient bucket elements (DDP: the same bytes).")
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def ds_config(args: argparse.Namespace) -> dict:
    return {
        "train_micro_batch_size_per_gpu": args.micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "zero_optimization": {"stage": args.stage, "reduce_bucket_size": int(args.bucket),
                              "allgather_bucket_size": int(args.bucket)},
        "steps_per_print": 10**9,
    }


def build(args: argparse.Namespace, model: torch.nn.Module):
    """(forward_backward_step(x, y), name) for the chosen system."""
    if args.system == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        dist.init_process_group("gloo")
        ddp = DDP(model, bucket_cap_mb=args.bucket * 4 / 2**20)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, weight_decay=0.01)

        def step(x, y):
            loss = ddp(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            return loss
        return step
    if args.system == "shardspeed":
        import shardspeed as engine_lib
    else:
        import deepspeed as engine_lib

        engine_lib.init_distributed(dist_backend="gloo")
    engine, _, _, _ = engine_lib.initialize(model=model, model_parameters=model.parameters(), config=ds_config(args))

    def step(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss
    return step


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=args.vocab, seq_len=args.seq, num_layers=args.layers, hidden_size=args.hidden,
                          num_heads=args.heads, tie_embeddings=False))
    step = build(args, model)
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1 + rank)
    data = [torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g) for _ in range(4)]
    for i in range(args.warmup):
        step(data[i % 4][:, :-1], data[i % 4][:, 1:])
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(data[i % 4][:, :-1], data[i % 4][:, 1:])
    dist.barrier()
    elapsed = time.perf_counter() - t0
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, rss)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(json.dumps({
            "system": args.system, "stage": args.stage, "world": world, "params": params,
            "tokens_per_s": args.steps * args.micro * args.seq * world / elapsed,
            "peak_rss_mib": [round(t.item(), 1) for t in gathered], "final_loss": loss.item(),
        }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
