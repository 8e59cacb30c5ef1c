"""What the three command-line steps (`step1_sft`, `step2_reward`, `step3_ppo`) share: DeepSpeed-Chat's
common arguments, the tokenizer rule, engines, data loaders and saving in Hugging Face format.

Saving (`save_hf_format`): LoRA merged into plain `nn.Linear`s, parameters gathered (ZeRO-3), rank 0
writes the folder. A causal LM is written with `save_pretrained` (so `transformers` and the next step
load it); a `RewardModel` as `pytorch_model.bin` (keys `v_head.weight`, `rwtransformer.*`, what
DeepSpeed-Chat's step 3 reads) beside its backbone's `config.json`. The tokenizer goes to the same folder.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..api import initialize
from ..offload.cpu_optimizers import DeepSpeedCPUAdam, FusedAdam
from ..runtime.engine import ShardspeedEngine
from ..zero import GatheredParameters
from .ds_utils import get_optimizer_grouped_parameters, get_train_ds_config
from .lora import (LinearLayer_LoRA, convert_linear_layer_to_lora, convert_lora_to_linear_layer,
                   make_model_gradient_checkpointing_compatible, only_optimize_lora_parameters)
from .data import parse_data_split
from .reward_model import RewardModel


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """DeepSpeed-Chat's data arguments (all three steps)."""
    parser.add_argument("--data_path", nargs="*", default=["Dahoas/rm-static"],
                        help="local/jsonfile, a folder with train.json/eval.json, or a .json/.jsonl file (several allowed)")
    parser.add_argument("--data_split", type=str, default="2,4,4",
                        help="shares of the data for phases 1 (SFT), 2 (reward model), 3 (PPO)")
    parser.add_argument("--data_output_path", type=str, default="/tmp/data_files",
                        help="DeepSpeed-Chat caches tokenized data here; shardspeed tokenizes in memory and ignores it")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher (read from LOCAL_RANK here)")
    parser.add_argument("--output_dir", type=str, default=None, help="where the model is saved (Hugging Face format)")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--dtype", type=str, default="fp16", choices=["fp16", "bf16", "fp32"],
                        help="fp32 is shardspeed's addition (CPUs)")
    parser.add_argument("--enable_tensorboard", action="store_true")
    parser.add_argument("--tensorboard_path", type=str, default="step_tensorboard")
    parser.add_argument("--add_eot_token", action="store_true")
    parser.add_argument("--eot_token", type=str, default="<|endoftext|>")
    parser.add_argument("--enable_test_mode", action="store_true", help="stop after --test_stop_step steps")
    parser.add_argument("--test_stop_step", type=int, default=0)


def add_train_args(parser: argparse.ArgumentParser, learning_rate: float, num_padding: bool) -> None:
    """Steps 1 and 2's model and optimisation arguments, with DeepSpeed-Chat's defaults."""
    parser.add_argument("--sft_only_data_path", nargs="*", default=[])
    parser.add_argument("--model_name_or_path", type=str, required=True, help="a local Hugging Face folder")
    parser.add_argument("--per_device_train_batch_size", type=int, default=16)
    parser.add_argument("--per_device_eval_batch_size", type=int, default=16)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--learning_rate", type=float, default=learning_rate)
    parser.add_argument("--weight_decay", type=float, default=0.0)
    parser.add_argument("--num_train_epochs", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--lr_scheduler_type", type=str, default="cosine")
    parser.add_argument("--num_warmup_steps", type=int, default=0)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--dropout", type=float, default=None)
    parser.add_argument("--zero_stage", type=int, default=0)
    parser.add_argument("--lora_dim", type=int, default=0)
    parser.add_argument("--lora_module_name", type=str, default="decoder.layers.")
    parser.add_argument("--only_optimize_lora", action="store_true")
    parser.add_argument("--lora_learning_rate", type=float, default=5e-4)
    parser.add_argument("--compute_fp32_loss", action="store_true")
    parser.add_argument("--print_loss", action="store_true")
    if num_padding:
        parser.add_argument("--num_padding_at_beginning", type=int, default=1,
                            help="OPT's tokenizer starts every row with one pad; 0 for most others")


def check_common_args(args: argparse.Namespace) -> None:
    """Checks every step makes before loading anything: `--data_split` well formed, `--output_dir` given."""
    parse_data_split(args.data_split)
    if not args.output_dir:
        raise ValueError("--output_dir is required: the trained model is saved there in Hugging Face format")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def log(message: str) -> None:
    """Rank 0 speaks, with the world size."""
    if rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"[rank 0 | dp={world}] {message}", flush=True)


def result(values: dict[str, Any]) -> None:
    """The machine-readable summary line (`RESULT {...}`), printed by rank 0."""
    if rank() == 0:
        print("RESULT " + json.dumps(values), flush=True)


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved with the model, with DeepSpeed-Chat's rule: no pad token -> pad = eos (announced);
    neither pad nor eos -> a clear error. Padding on the right (phase 3 pads prompts on the left itself)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a local folder; shardspeed.chat loads models and tokenizers from "
                                "local Hugging Face folders and downloads nothing")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer in {path} has neither a pad token nor an eos token: set one, e.g. "
                             "tokenizer.add_special_tokens({'pad_token': '<pad>'}) (or pad = eos as DeepSpeed-Chat does "
                             "for non-LLaMA models) and save it with tokenizer.save_pretrained(folder)")
        tokenizer.pad_token = tokenizer.eos_token
        log(f"tokenizer of {path} has no pad token: using eos {tokenizer.eos_token!r} as pad (DeepSpeed-Chat's rule)")
    tokenizer.padding_side = "right"
    return tokenizer


def apply_lora(model: nn.Module, lora_dim: int, module_name: str, only_lora: bool, keep: Sequence[str] = ()) -> nn.Module:
    """DeepSpeed-Chat's LoRA set-up; an error when `module_name` matches no `nn.Linear`."""
    if lora_dim <= 0:
        return model
    model = convert_linear_layer_to_lora(model, module_name, lora_dim)
    if not any(isinstance(m, LinearLayer_LoRA) for m in model.modules()):
        raise ValueError(f"--lora_dim {lora_dim}: no nn.Linear has {module_name!r} in its name (--lora_module_name; "
                         "Llama's layers are 'layers.', GPT-2's Conv1D layers cannot take LoRA)")
    if only_lora:
        model = make_model_gradient_checkpointing_compatible(only_optimize_lora_parameters(model, keep))
    return model


def train_engine(model: nn.Module, args: argparse.Namespace, num_training_steps: int) -> ShardspeedEngine:
    """An engine with DeepSpeed-Chat's train config, Adam (betas 0.9, 0.95) and the HF scheduler."""
    from transformers import get_scheduler

    world = dist.get_world_size()
    config = get_train_ds_config(offload=args.offload, dtype=args.dtype, stage=args.zero_stage,
                                 enable_tensorboard=args.enable_tensorboard, tb_path=args.tensorboard_path,
                                 tb_name="step")
    config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    config["train_batch_size"] = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    groups = get_optimizer_grouped_parameters(model, args.weight_decay, args.lora_learning_rate)
    optimizer = (DeepSpeedCPUAdam if args.offload else FusedAdam)(groups, lr=args.learning_rate, betas=(0.9, 0.95))
    scheduler = get_scheduler(name=args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.num_warmup_steps,
                              num_training_steps=num_training_steps)
    engine, *_ = initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def loader(dataset: Sequence[Any], batch_size: int, seed: int, shuffle: bool,
           collate: Callable[[list[Any]], Any] | None = None) -> DataLoader:
    """Each rank reads its share (`DistributedSampler`, seeded)."""
    sampler: DistributedSampler[Any] = DistributedSampler(dataset, shuffle=shuffle, seed=seed)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)  # type: ignore[arg-type]


def step_data(args: argparse.Namespace, phase: int, build: Callable[..., Sequence[Any]],
              collate: Callable[..., Any] | None = None) -> tuple[Any, list[Any], list[Any], DataLoader, DataLoader]:
    """What steps 1 and 2 begin with: processes, seed, tokenizer, this phase's rows and their loaders.
    `build(rows, tokenizer, max_seq_len, eot)` makes a dataset of the step's kind."""
    from ..comm.init import init_distributed
    from .data import phase_rows

    init_distributed()
    torch.manual_seed(args.seed)
    tokenizer = load_tokenizer(args.model_name_or_path)
    eot = args.eot_token if args.add_eot_token else ""
    train_rows, eval_rows = phase_rows(args.data_path, args.data_split, phase, args.seed)
    train_loader = loader(build(train_rows, tokenizer, args.max_seq_len, eot), args.per_device_train_batch_size,
                          args.seed, shuffle=True, collate=collate)
    eval_loader = loader(build(eval_rows, tokenizer, args.max_seq_len, eot), args.per_device_eval_batch_size,
                         args.seed, shuffle=False, collate=collate)
    return tokenizer, train_rows, eval_rows, train_loader, eval_loader


def set_epoch(data: DataLoader, epoch: int) -> None:
    """Reshuffle a `loader`'s rows for `epoch` (the same order on every rank)."""
    if isinstance(data.sampler, DistributedSampler):
        data.sampler.set_epoch(epoch)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def save_hf_format(model: nn.Module, tokenizer: Any, output_dir: str) -> None:
    """Write `model` (LoRA merged, gathered under ZeRO-3) and the tokenizer to `output_dir` (see the module docstring).
    Every rank must call it (gathering is collective)."""
    model = convert_lora_to_linear_layer(model)
    params = list(model.parameters())
    with GatheredParameters(params):
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if rank() == 0 else {}
    if rank() == 0:
        os.makedirs(output_dir, exist_ok=True)
        if isinstance(model, RewardModel):
            getattr(model.rwtransformer, "config").save_pretrained(output_dir)
            torch.save(state, os.path.join(output_dir, "pytorch_model.bin"))
        else:
            getattr(model, "save_pretrained")(output_dir, state_dict=state)
        tokenizer.save_pretrained(output_dir)
    if dist.is_initialized():
        dist.barrier()


__all__ = ["add_data_args", "add_train_args", "apply_lora", "check_common_args", "load_tokenizer", "loader", "log",
           "result", "save_hf_format", "set_epoch", "to_device", "train_engine"]
