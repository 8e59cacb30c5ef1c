"""Train a small GPT on the Python standard library's source, byte by byte, with shardspeed.

    shardspeed --num_gpus 2 examples/train_gpt.py --deepspeed_config examples/configs/stage0_fp32.json

Written against DeepSpeed's API: replace `import shardspeed as deepspeed` with `import deepspeed`
and it runs under DeepSpeed too. Rank 0 shows a progress bar with loss and tokens/s, saves a
checkpoint at the end and prints a one-line summary. Started again, it resumes from that checkpoint
and trains `--steps` more, stretching a decaying LR schedule to end where this run ends. Each config
keeps its own checkpoints (`checkpoints/<config name>`); a checkpoint of another model shape or
config is refused, not silently loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shardspeed as deepspeed  # noqa: E402
from gpt import GPT, GPTConfig, num_parameters  # noqa: E402
from stdlib_corpus import train_val_split  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the launcher.")
    parser.add_argument("--steps", type=int, default=100, help="Optimizer steps to run in this invocation.")
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--corpus_bytes", type=int, default=4_000_000, help="Bytes of stdlib source to train on.")
    parser.add_argument("--save_dir", default=None,
                        help="Checkpoint folder; resumed from if it has one (default: checkpoints/<config name>).")
    parser.add_argument("--no_resume", action="store_true", help="Start fresh even if save_dir has a checkpoint.")
    parser.add_argument("--seed", type=int, default=1234)
    deepspeed.add_config_arguments(parser)
    return parser.parse_args()


@torch.no_grad()
def evaluate(engine, dataset, batches: int = 8) -> float:
    engine.eval()
    micro = engine.train_micro_batch_size_per_gpu()
    losses = []
    for i in range(min(batches, len(dataset) // micro)):
        items = [dataset[i * micro + j] for j in range(micro)]
        ids = torch.stack([it["input_ids"] for it in items]).to(engine.device)
        labels = torch.stack([it["labels"] for it in items]).to(engine.device)
        losses.append(engine(ids, labels).item())
    engine.train()
    return sum(losses) / max(len(losses), 1)


RUN_FILE = "train_gpt_run.json"  # beside the checkpoints: what they were trained with


def run_identity(args: argparse.Namespace) -> dict:
    """What a checkpoint must have been trained with for this run to continue it."""
    config = args.deepspeed_config or args.shardspeed_config
    return {"config": os.path.basename(config) if config else None, "seq_len": args.seq_len, "layers": args.layers,
            "hidden": args.hidden, "heads": args.heads}


def resume(engine, args: argparse.Namespace, rank: int) -> None:
    """Load the latest checkpoint in save_dir if it is this run's kind; stretch the LR schedule over the new steps."""
    if args.no_resume or not os.path.isfile(os.path.join(args.save_dir, "latest")):
        return
    record = os.path.join(args.save_dir, RUN_FILE)
    saved = json.loads(open(record).read()) if os.path.isfile(record) else None
    mine = run_identity(args)
    if saved is not None and saved != mine:  # refuse before loading anything
        differs = ", ".join(f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in mine.items() if saved.get(k) != v)
        raise SystemExit(f"{args.save_dir} holds a checkpoint trained with other settings ({differs}): pass --save_dir "
                         "for a folder of its own, or --no_resume to start afresh there")
    path, _ = engine.load_checkpoint(args.save_dir)
    end = engine.global_steps + args.steps
    schedule = engine.lr_scheduler
    stretched = ""
    if getattr(schedule, "total_num_steps", end) < end:  # a decaying schedule would sit at its floor
        stretched = f"; LR schedule stretched from {schedule.total_num_steps} to {end} steps"
        schedule.total_num_steps = end
    if rank == 0:
        print(f"resumed from {path} at step {engine.global_steps} (lr {engine.get_lr()[0]:.2e}); "
              f"training to step {end}{stretched}")


def main() -> None:
    args = parse_args()
    config = args.deepspeed_config or args.shardspeed_config
    if args.save_dir is None:
        args.save_dir = os.path.join("checkpoints", os.path.splitext(os.path.basename(config))[0] if config else "gpt")
    deepspeed.init_distributed()
    rank = torch.distributed.get_rank()
    torch.manual_seed(args.seed)
    train_set, val_set = train_val_split(args.seq_len, args.corpus_bytes)
    model = GPT(GPTConfig(seq_len=args.seq_len, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads))
    engine, _, loader, _ = deepspeed.initialize(args=args, model=model, training_data=train_set)
    resume(engine, args, rank)

    tokens_per_step = engine.train_batch_size() * args.seq_len
    gas = engine.gradient_accumulation_steps()
    start_step, t0, loss_sum = engine.global_steps, time.perf_counter(), 0.0
    bar = tqdm(initial=start_step, total=start_step + args.steps, disable=rank != 0, desc="train", unit="step",
               dynamic_ncols=True)
    batches = iter(loader)
    while engine.global_steps < start_step + args.steps:
        try:
            batch = next(batches)
        except StopIteration:  # next epoch
            batches = iter(loader)
            continue
        loss = engine(batch["input_ids"].to(engine.device), batch["labels"].to(engine.device))
        engine.backward(loss)
        loss_sum += loss.item() / gas
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        if boundary:
            elapsed = time.perf_counter() - t0
            done = engine.global_steps - start_step
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{done * tokens_per_step / elapsed:,.0f}")
            bar.update(1)
            last_loss, loss_sum = loss_sum, 0.0
    bar.close()
    elapsed = time.perf_counter() - t0
    val_loss = evaluate(engine, val_set)
    engine.save_checkpoint(args.save_dir, client_state={"val_loss": val_loss})
    if rank == 0:
        with open(os.path.join(args.save_dir, RUN_FILE), "w") as f:
            json.dump(run_identity(args), f)
    if rank == 0:
        print(
            f"summary: {num_parameters(model) / 1e6:.2f}M params, world {engine.world_size}, "
            f"stage {engine.zero_optimization_stage()}, steps {engine.global_steps}, train loss {last_loss:.4f}, "
            f"val loss {val_loss:.4f}, {args.steps * tokens_per_step / elapsed:,.0f} tokens/s, "
            f"checkpoint {os.path.join(args.save_dir, 'global_step' + str(engine.global_steps))}"
        )
    engine.destroy()


if __name__ == "__main__":
    main()
