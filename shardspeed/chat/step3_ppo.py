"""DeepSpeed-Chat's step 3, PPO (`training/step3_rlhf_finetuning/main.py`).

    python -m shardspeed.chat.step3_ppo --data_path DATA --actor_model_name_or_path STEP1_OUT \
        --critic_model_name_or_path STEP2_OUT --output_dir OUT ...
    shardspeed --num_gpus 2 --module shardspeed.chat.step3_ppo ...   (or torchrun -m)

Per batch of phase-3 prompts (left-padded to `--max_prompt_seq_len`): `generate_experience`, buffered
`--generation_batches` times and cut into `--per_device_training_batch_size` pieces (DeepSpeed-Chat's
`MiniDataset`), then `--ppo_epochs` passes of `train_rlhf` over the pieces (and the EMA update with
`--enable_ema`). Every step logs the reward model's mean score of the rollouts (over all ranks). The
actor is saved to `OUT/actor` (Hugging Face causal LM), the critic to `OUT/critic` (step 2's layout),
the EMA actor to `OUT/actor_ema`.

Beyond DeepSpeed-Chat: PPO's hyper-parameters (`--kl_ctl`, `--clip_reward_value`, `--cliprange`,
`--cliprange_value`, `--gamma`, `--lam`; DeepSpeed-Chat hard-codes them) and the sampling options
(`--do_sample`, `--temperature`, `--top_p`, `--top_k`; unset: the model's generation config decides).
Not supported: the unsupervised (PTX) dataset (it needs a Hub download) — refused with a message.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm.init import init_distributed
from .arguments import STEP3_DEFAULTS
from .cli import add_data_args, load_tokenizer, loader, log, result, save_hf_format, set_epoch, to_device
from .data import collate_prompts, parse_data_split, phase_rows, prompt_dataset
from .utils import unwrap

FLOAT_OR_NONE = ("actor_dropout", "critic_dropout", "temperature", "top_p")
_NOT_ARGS = ("end_of_conversation_token",)


def _add_step3_defaults(parser: argparse.ArgumentParser) -> None:
    """One flag per `STEP3_DEFAULTS` entry, with its default (booleans are switches)."""
    for name, default in STEP3_DEFAULTS.items():
        if name in _NOT_ARGS:
            continue
        flag = f"--{name}"
        if flag in parser._option_string_actions:  # a data/common argument (--offload, --dtype, ...): its default
            parser.set_defaults(**{name: default})
        elif name == "do_sample":
            parser.add_argument(flag, action="store_true", default=None, help="sample rollouts (default: model's config)")
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        elif default is None:
            parser.add_argument(flag, type=float if name in FLOAT_OR_NONE else int, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="DeepSpeed-Chat step 3: PPO")
    add_data_args(parser)
    parser.add_argument("--actor_model_name_or_path", type=str, required=True, help="step 1's --output_dir")
    parser.add_argument("--critic_model_name_or_path", type=str, required=True, help="step 2's --output_dir")
    parser.add_argument("--unsupervised_dataset_name", type=str, default=None)
    parser.add_argument("--unsupervised_dataset_config_name", type=str, default=None)
    _add_step3_defaults(parser)
    args = parser.parse_args(argv)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    """The combinations DeepSpeed-Chat refuses, and the ones shardspeed cannot do, as clear errors."""
    parse_data_split(args.data_split)
    if not args.output_dir:
        raise ValueError("--output_dir is required: the actor and critic are saved under it (actor/, critic/)")
    gen, train = args.per_device_generation_batch_size, args.per_device_training_batch_size
    if gen <= 0 or train <= 0 or gen % train != 0:
        raise ValueError(f"--per_device_generation_batch_size {gen} must be a positive multiple of "
                         f"--per_device_training_batch_size {train}: each rollout batch is cut into training batches "
                         f"({gen} % {train} = {gen % train if train > 0 else 'undefined'})")
    if args.unsupervised_dataset_name or args.unsupervised_dataset_config_name:
        raise ValueError("--unsupervised_dataset_name (PTX mixing) needs a Hugging Face Hub download, which "
                         "shardspeed.chat does not do; use DeepSpeedPPOTrainerUnsupervised from Python with local batches")
    if args.inference_tp_size > 1 and args.actor_zero_stage != 3:
        raise ValueError(f"--inference_tp_size {args.inference_tp_size} needs --actor_zero_stage 3 (DeepSpeed-Chat's "
                         f"rule), got {args.actor_zero_stage}")


class MiniDataset:
    """DeepSpeed-Chat's `MiniDataset`: buffer `max_size` experiences, then cut each into `small_batch_size` pieces."""

    def __init__(self, max_size: int, small_batch_size: int) -> None:
        self.max_size, self.small_batch_size = max_size, small_batch_size
        self.dataset: list[dict[str, Tensor]] = []

    def add(self, data: dict[str, Tensor]) -> list[dict[str, Tensor]] | None:
        self.dataset.append(data)
        if len(self.dataset) < self.max_size:
            return None
        pieces = []
        for exp in self.dataset:
            rows = len(exp["input_ids"])
            for i in range(0, rows, self.small_batch_size):
                # `prompts` may hold more rows than the answers (empty answers are dropped); only its width is read
                pieces.append({k: v[i:i + self.small_batch_size] for k, v in exp.items()})
        self.dataset = []
        return pieces


def mean_over_ranks(value: Tensor) -> float:
    """The mean of `value` over every row of every rank (ranks may hold different row counts)."""
    total = torch.stack([value.float().sum(), torch.tensor(float(value.numel()), device=value.device)])
    if dist.is_initialized():
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp(min=1))


def train(args: argparse.Namespace, trainer: Any, prompt_loader: Any) -> tuple[list[float], int]:
    """DeepSpeed-Chat's step-3 loop; returns the mean reward score of each step's rollouts and the PPO updates done."""
    mini = MiniDataset(args.generation_batches, args.per_device_training_batch_size)
    scores: list[float] = []
    updates, stop = 0, False
    device = trainer.actor_model.device
    for epoch in range(args.num_train_epochs):
        set_epoch(prompt_loader, epoch)
        for step, batch in enumerate(prompt_loader):
            batch = to_device(batch, device)
            exp = trainer.generate_experience(batch["prompt"], batch["prompt_att_mask"], step)
            scores.append(mean_over_ranks(exp["rewards"]))
            pieces = mini.add(exp)
            losses = []
            if pieces is not None:
                for _ in range(args.ppo_epochs):
                    for piece in pieces:
                        actor_loss, critic_loss = trainer.train_rlhf(piece)
                        losses.append((actor_loss.item(), critic_loss.item()))
                        updates += 1
                        if args.enable_ema:
                            trainer.update_ema()
            if losses:
                log(f"epoch {epoch} step {step}: reward score {scores[-1]:.4f} | actor loss {losses[-1][0]:.4f} | "
                    f"critic loss {losses[-1][1]:.4f} | generate {trainer.generate_time:.2f}s")
            stop = args.enable_test_mode and step + 1 >= args.test_stop_step
            if stop:
                break
        if stop:
            break
    return scores, updates


def main(argv: Sequence[str] | None = None) -> int:
    from .ppo_trainer import DeepSpeedPPOTrainer
    from .rlhf_engine import DeepSpeedRLHFEngine

    args = parse_args(argv)
    init_distributed()
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.actor_model_name_or_path)
    train_rows, _ = phase_rows(args.data_path, args.data_split, 3, args.seed)
    prompts, filtered = prompt_dataset(train_rows, tokenizer, args.max_prompt_seq_len)
    prompt_loader = loader(prompts, args.per_device_generation_batch_size, args.seed, shuffle=True,
                           collate=collate_prompts)
    per_rollout = args.per_device_generation_batch_size // args.per_device_training_batch_size
    num_total_iters = math.ceil(len(prompt_loader) * per_rollout * args.ppo_epochs / args.gradient_accumulation_steps
                                ) * args.num_train_epochs
    args.gradient_accumulation_steps_actor = args.gradient_accumulation_steps
    engine = DeepSpeedRLHFEngine(args.actor_model_name_or_path, args.critic_model_name_or_path, tokenizer, args,
                                 num_total_iters)
    if args.actor_gradient_checkpointing:
        unwrap(engine.actor).gradient_checkpointing_enable()  # type: ignore[operator]
    trainer = DeepSpeedPPOTrainer(engine, args)
    log(f"step 3: {len(prompts)} prompts ({filtered} longer than --max_prompt_seq_len dropped); "
        f"{len(prompt_loader)} rollout batches per epoch")
    start = time.perf_counter()
    scores, updates = train(args, trainer, prompt_loader)
    save_hf_format(unwrap(engine.actor), tokenizer, f"{args.output_dir}/actor")
    save_hf_format(unwrap(engine.critic), tokenizer, f"{args.output_dir}/critic")
    if engine.actor_ema is not None:
        save_hf_format(unwrap(engine.actor_ema), tokenizer, f"{args.output_dir}/actor_ema")
    log(f"saved to {args.output_dir}/actor and {args.output_dir}/critic")
    result({"step": 3, "scores": scores, "ppo_updates": updates, "seconds": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
