"""DeepSpeed-Chat's step 2, the reward model (`training/step2_reward_model_finetuning/main.py`).

    python -m shardspeed.chat.step2_reward --data_path DATA --model_name_or_path MODEL --output_dir OUT ...
    shardspeed --num_gpus 2 --module shardspeed.chat.step2_reward ...   (or torchrun -m)

Trains a `RewardModel` (the model's backbone + `v_head`) on phase 2's pairs with DeepSpeed-Chat's span
loss; eval reports the mean chosen / rejected end scores and `acc = mean(chosen > rejected)` as
DeepSpeed-Chat's `evaluation_reward` does. Saves `pytorch_model.bin` + `config.json` + tokenizer to
`--output_dir`, what step 3's `--critic_model_name_or_path` reads.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist

from .cli import (add_data_args, add_train_args, apply_lora, check_common_args, log, result, save_hf_format, set_epoch,
                  step_data, to_device, train_engine)
from .data import collate_pairs, pair_dataset
from .model_utils import create_critic_model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DeepSpeed-Chat step 2: reward model")
    add_data_args(parser)
    add_train_args(parser, learning_rate=5e-5, num_padding=True)
    parser.add_argument("--eval_interval", type=int, default=0, help="evaluate every N steps (0: per epoch only)")
    parser.add_argument("--eval_iters", type=int, default=100, help="at most this many eval batches")
    args = parser.parse_args(argv)
    check_common_args(args)
    return args


def evaluation_reward(engine: Any, eval_loader: Any, eval_iters: int) -> dict[str, float]:
    """DeepSpeed-Chat's `evaluation_reward`: mean chosen and rejected end scores and the pair accuracy, over ranks."""
    engine.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct, pairs, sum chosen, sum rejected
    with torch.no_grad():
        for i, batch in enumerate(eval_loader):
            if i >= eval_iters:
                break
            out = engine(**to_device(batch, engine.device))
            chosen, rejected = out["chosen_mean_scores"].double().cpu(), out["rejected_mean_scores"].double().cpu()
            totals += torch.stack([(chosen > rejected).sum().double(), torch.tensor(float(len(chosen))),
                                   chosen.sum(), rejected.sum()])
    engine.train()
    if dist.is_initialized():
        moved = totals.to(engine.device)
        dist.all_reduce(moved)
        totals = moved.cpu()
    pairs = max(float(totals[1]), 1.0)
    return {"acc": float(totals[0]) / pairs, "chosen_score": float(totals[2]) / pairs,
            "rejected_score": float(totals[3]) / pairs}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tokenizer, train_rows, eval_rows, train_loader, eval_loader = step_data(args, 2, pair_dataset, collate_pairs)
    model = create_critic_model(args.model_name_or_path, tokenizer, num_padding_at_beginning=args.num_padding_at_beginning,
                                dropout=args.dropout, compute_fp32_loss=args.compute_fp32_loss)
    trained = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora, keep=["v_head.weight"])
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    steps = math.ceil(len(train_loader) / args.gradient_accumulation_steps) * args.num_train_epochs
    engine = train_engine(trained, args, steps)
    log(f"step 2: {len(train_rows)} train / {len(eval_rows)} eval pairs; {steps} optimizer steps")
    before = evaluation_reward(engine, eval_loader, args.eval_iters)
    log(f"before training: {before}")
    start, step, stop = time.perf_counter(), 0, False
    for epoch in range(args.num_train_epochs):
        set_epoch(train_loader, epoch)
        for batch in train_loader:
            loss = engine(**to_device(batch, engine.device))["loss"]
            engine.backward(loss)
            engine.step()
            step += 1
            if args.print_loss:
                log(f"epoch {epoch} step {step} loss {loss.item():.4f}")
            if args.eval_interval and step % args.eval_interval == 0:
                log(f"step {step}: {evaluation_reward(engine, eval_loader, args.eval_iters)}")
            stop = args.enable_test_mode and step >= args.test_stop_step
            if stop:
                break
        log(f"epoch {epoch}: {evaluation_reward(engine, eval_loader, args.eval_iters)}")
        if stop:
            break
    after = evaluation_reward(engine, eval_loader, args.eval_iters)
    save_hf_format(engine.module, tokenizer, args.output_dir)
    log(f"saved to {args.output_dir}")
    result({"step": 2, "acc_before": before["acc"], "acc": after["acc"], "chosen_score": after["chosen_score"],
            "rejected_score": after["rejected_score"], "train_steps": step, "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
