"""DeepSpeed-Chat's step-3 arguments and their defaults (`training/step3_rlhf_finetuning/main.py`).

The RLHF engine and the PPO trainer take DeepSpeed-Chat's `args` namespace; an attribute it lacks takes
the default below, so a namespace with only the arguments that matter works. The last block is
shardspeed's: PPO's hyper-parameters (DeepSpeed-Chat hard-codes them in the trainer) and generation
options (None: the model's `generation_config` decides, as in DeepSpeed-Chat).
"""
from __future__ import annotations

from typing import Any

STEP3_DEFAULTS: dict[str, Any] = {
    "per_device_generation_batch_size": 16, "per_device_training_batch_size": 16, "generation_batches": 1,
    "ppo_epochs": 1, "max_prompt_seq_len": 256, "max_answer_seq_len": 256, "num_padding_at_beginning": 1,
    "actor_learning_rate": 9.65e-6, "critic_learning_rate": 5e-6, "actor_weight_decay": 0.0, "critic_weight_decay": 0.0,
    "num_train_epochs": 1, "lr_scheduler_type": "cosine", "gradient_accumulation_steps": 1, "num_warmup_steps": 100,
    "enable_hybrid_engine": False, "unpin_actor_parameters": False, "release_inference_cache": False,
    "inference_tp_size": 1, "tp_gather_partition_size": 8, "offload": False, "dtype": "fp16",
    "offload_reference_model": False, "offload_reward_model": False, "actor_zero_stage": 0, "critic_zero_stage": 0,
    "actor_gradient_checkpointing": False, "critic_gradient_checkpointing": False, "actor_dropout": None,
    "critic_dropout": None, "actor_lora_dim": 0, "actor_lora_module_name": "decoder.layers.", "critic_lora_dim": 0,
    "critic_lora_module_name": "decoder.layers.", "only_optimize_lora": False, "actor_lora_learning_rate": 5e-4,
    "critic_lora_learning_rate": 5e-4, "enable_ema": False, "enable_mixed_precision_lora": False,
    "compute_fp32_loss": False, "enable_tensorboard": False, "tensorboard_path": "step3_tensorboard",
    "align_overflow": False, "print_answers": False, "print_answers_interval": 1, "unsup_coef": 27.8,
    "end_of_conversation_token": "<|endoftext|>",
    # shardspeed: PPO's hyper-parameters (DeepSpeed-Chat's values) and generation options
    "kl_ctl": 0.1, "clip_reward_value": 5.0, "cliprange": 0.2, "cliprange_value": 0.2, "gamma": 1.0, "lam": 0.95,
    "do_sample": None, "temperature": None, "top_p": None, "top_k": None,
}


def step3_arg(args: Any, name: str) -> Any:
    """`args.<name>`, or DeepSpeed-Chat's default when `args` has no such attribute."""
    if name not in STEP3_DEFAULTS:
        raise KeyError(f"{name} is not a step-3 argument")
    return getattr(args, name, STEP3_DEFAULTS[name])


def gradient_accumulation_steps_actor(args: Any) -> int:
    """`args.gradient_accumulation_steps_actor` (step 3's main sets it), or DeepSpeed-Chat's rule: the accumulation
    steps, doubled when the unsupervised (PTX) loss is mixed in (its step is a second micro step of the actor)."""
    given = getattr(args, "gradient_accumulation_steps_actor", None)
    if given is not None:
        return int(given)
    steps = int(step3_arg(args, "gradient_accumulation_steps"))
    ptx = getattr(args, "unsupervised_dataset_name", None) and getattr(args, "unsupervised_dataset_config_name", None)
    return steps * 2 if ptx else steps


__all__ = ["STEP3_DEFAULTS", "gradient_accumulation_steps_actor", "step3_arg"]
