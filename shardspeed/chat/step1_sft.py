"""DeepSpeed-Chat's step 1, supervised fine-tuning (`training/step1_supervised_finetuning/main.py`).

    python -m shardspeed.chat.step1_sft --data_path DATA --model_name_or_path MODEL --output_dir OUT ...
    shardspeed --num_gpus 2 --module shardspeed.chat.step1_sft ...   (or torchrun -m)

Trains a causal LM on phase 1's `prompt + chosen` rows (cross-entropy, the prompt included), reports
eval perplexity before and after, saves the model and tokenizer in Hugging Face format to `--output_dir`.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Sequence

import torch

from .cli import (add_data_args, add_train_args, apply_lora, check_common_args, log, result, save_hf_format, set_epoch,
                  step_data, to_device, train_engine)
from .data import sft_dataset
from .model_utils import create_hf_model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DeepSpeed-Chat step 1: supervised fine-tuning")
    add_data_args(parser)
    add_train_args(parser, learning_rate=1e-3, num_padding=False)
    args = parser.parse_args(argv)
    check_common_args(args)
    return args


def evaluate_ppl(engine: Any, eval_loader: Any) -> float:
    """exp(mean eval loss), averaged over ranks."""
    engine.eval()
    losses = []
    with torch.no_grad():
        for batch in eval_loader:
            losses.append(engine(**to_device(batch, engine.device)).loss.float())
    engine.train()
    mean = torch.stack(losses).mean() if losses else torch.tensor(float("nan"))
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    return math.exp(min(float(mean), 50.0))


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    args = parse_args(argv)
    tokenizer, train_rows, eval_rows, train_loader, eval_loader = step_data(args, 1, sft_dataset)
    model = create_hf_model(AutoModelForCausalLM, args.model_name_or_path, tokenizer, dropout=args.dropout)
    model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    if args.gradient_checkpointing:
        getattr(model, "gradient_checkpointing_enable")()
    steps = math.ceil(len(train_loader) / args.gradient_accumulation_steps) * args.num_train_epochs
    engine = train_engine(model, args, steps)
    log(f"step 1: {len(train_rows)} train / {len(eval_rows)} eval rows; {steps} optimizer steps")
    ppl_before = evaluate_ppl(engine, eval_loader)
    log(f"eval ppl before training: {ppl_before:.3f}")
    start, step = time.perf_counter(), 0
    for epoch in range(args.num_train_epochs):
        set_epoch(train_loader, epoch)
        for batch in train_loader:
            loss = engine(**to_device(batch, engine.device), use_cache=False).loss
            engine.backward(loss)
            engine.step()
            step += 1
            if args.print_loss:
                log(f"epoch {epoch} step {step} loss {loss.item():.4f}")
            if args.enable_test_mode and step >= args.test_stop_step:
                break
        log(f"epoch {epoch}: eval ppl {evaluate_ppl(engine, eval_loader):.3f}")
    ppl_after = evaluate_ppl(engine, eval_loader)
    save_hf_format(engine.module, tokenizer, args.output_dir)
    log(f"saved to {args.output_dir}")
    result({"step": 1, "ppl_before": ppl_before, "ppl_after": ppl_after, "train_steps": step,
            "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
