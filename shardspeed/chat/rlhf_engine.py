"""DeepSpeed-Chat's `DeepSpeedRLHFEngine` (`dschat/rlhf/rlhf_engine.py`): the engines of step 3.

| engine | model | ZeRO stage | optimizer |
| --- | --- | --- | --- |
| `actor` | actor path, causal LM (+ LoRA per `actor_lora_dim`); a `DeepSpeedHybridEngine` with `enable_hybrid_engine` | `actor_zero_stage` | Adam (CPU Adam with `offload`), betas (0.9, 0.95), `actor_learning_rate`, HF `get_scheduler` |
| `ref` | actor path, frozen | 3 if the actor's is 3, else 0 | none |
| `actor_ema` (`enable_ema`) | actor path (+ LoRA) | as `ref` | none; `moving_average` updates it |
| `critic` | critic path: step 2's `RewardModel` (+ LoRA per `critic_lora_dim`) | `critic_zero_stage` | as the actor's, `critic_learning_rate` |
| `reward` | critic path, frozen | 3 if the critic's is 3, else 0 | none |

Each is a separate `shardspeed.initialize` with DeepSpeed-Chat's configs (`ds_utils`):
`train_micro_batch_size_per_gpu = per_device_training_batch_size` and `train_batch_size` = that x world
size x accumulation steps (the actor's doubled with PTX). Missing `args` attributes take DeepSpeed-Chat's
defaults (`arguments.STEP3_DEFAULTS`).

Two ways to build it:
- `DeepSpeedRLHFEngine(actor_model_name_or_path, critic_model_name_or_path, tokenizer, args, num_total_iters)`,
  DeepSpeed-Chat's: models from local Hugging Face folders (the critic's with step 2's weights).
- `DeepSpeedRLHFEngine.from_models(actor, critic, reward, tokenizer, args, num_total_iters=1, ref=None)`:
  already-built modules. `ref` (and the EMA copy) default to copies of `actor` taken before LoRA is
  applied, `reward` to a copy of `critic`; a `reward` without parameters (`rewards.CallableReward`) is
  used as it is, with no engine.
"""
from __future__ import annotations

import copy
from typing import Any

import torch.distributed as dist
from torch import nn

from ..api import initialize
from ..comm.init import init_distributed
from ..offload.cpu_optimizers import DeepSpeedCPUAdam, FusedAdam
from ..runtime.engine import ShardspeedEngine
from .arguments import gradient_accumulation_steps_actor, step3_arg
from .ds_utils import get_eval_ds_config, get_optimizer_grouped_parameters, get_train_ds_config
from .lora import (LinearLayer_LoRA, convert_linear_layer_to_lora, make_model_gradient_checkpointing_compatible,
                   only_optimize_lora_parameters)
from .model_utils import create_critic_model, create_hf_model


class DeepSpeedRLHFEngine:
    """The actor, reference, (EMA,) critic and reward engines of DeepSpeed-Chat's step 3 (see the module docstring)."""

    actor: ShardspeedEngine
    ref: ShardspeedEngine
    actor_ema: ShardspeedEngine | None
    critic: ShardspeedEngine
    reward: nn.Module  # an engine, or a parameter-free reward such as rewards.CallableReward

    def __init__(self, actor_model_name_or_path: str, critic_model_name_or_path: str, tokenizer: Any, args: Any,
                 num_total_iters: int) -> None:
        from transformers import AutoModelForCausalLM

        def actor_model(dropout: float | None = None) -> nn.Module:
            return create_hf_model(AutoModelForCausalLM, actor_model_name_or_path, tokenizer, dropout=dropout)

        def critic_model() -> nn.Module:
            return create_critic_model(critic_model_name_or_path, tokenizer, rlhf_training=True,
                                       num_padding_at_beginning=step3_arg(args, "num_padding_at_beginning"),
                                       dropout=step3_arg(args, "critic_dropout"))

        self._setup(tokenizer, args, num_total_iters)
        self._build(actor_model(step3_arg(args, "actor_dropout")), actor_model(),
                    actor_model() if step3_arg(args, "enable_ema") else None, critic_model(), critic_model())

    @classmethod
    def from_models(cls, actor: nn.Module, critic: nn.Module, reward: nn.Module | None, tokenizer: Any, args: Any,
                    num_total_iters: int = 1, ref: nn.Module | None = None) -> "DeepSpeedRLHFEngine":
        """The engines from already-built modules (see the module docstring); the modules become the engines' own."""
        engine = cls.__new__(cls)
        engine._setup(tokenizer, args, num_total_iters)
        ema = copy.deepcopy(actor) if step3_arg(args, "enable_ema") else None
        engine._build(actor, ref if ref is not None else copy.deepcopy(actor), ema, critic,
                      reward if reward is not None else copy.deepcopy(critic))
        return engine

    def _setup(self, tokenizer: Any, args: Any, num_total_iters: int) -> None:
        self.tokenizer, self.args, self.num_total_iters = tokenizer, args, num_total_iters
        if not dist.is_initialized():
            init_distributed()
        self._world = dist.get_world_size()

    def _build(self, actor: nn.Module, ref: nn.Module, ema: nn.Module | None, critic: nn.Module, reward: nn.Module) -> None:
        a = self.args
        actor_stage, critic_stage = step3_arg(a, "actor_zero_stage"), step3_arg(a, "critic_zero_stage")
        gas_actor, gas = gradient_accumulation_steps_actor(a), step3_arg(a, "gradient_accumulation_steps")
        self.actor = self._init_trained(self._lora(actor, "actor"), "actor", actor_stage, gas_actor)
        self.ref = self._init_frozen(ref, 3 if actor_stage == 3 else 0, step3_arg(a, "offload_reference_model"), gas_actor)
        self.actor_ema = None
        if ema is not None:
            self.actor_ema = self._init_frozen(self._lora(ema, "actor", optimize=False), 3 if actor_stage == 3 else 0,
                                               step3_arg(a, "offload_reference_model"), gas_actor)
        self.critic = self._init_trained(self._lora(critic, "critic"), "critic", critic_stage, gas)
        self.reward = reward
        if any(True for _ in reward.parameters()):
            self.reward = self._init_frozen(reward, 3 if critic_stage == 3 else 0, step3_arg(a, "offload_reward_model"), gas)
        if step3_arg(a, "critic_gradient_checkpointing"):
            self.critic.module.gradient_checkpointing_enable()  # type: ignore[operator]

    def _lora(self, model: nn.Module, role: str, optimize: bool = True) -> nn.Module:
        """DeepSpeed-Chat's LoRA set-up for the actor / critic (and the EMA copy, without changing what trains)."""
        dim = step3_arg(self.args, f"{role}_lora_dim")
        if dim <= 0:
            return model
        part = step3_arg(self.args, f"{role}_lora_module_name")
        model = convert_linear_layer_to_lora(model, part, dim)
        if not any(isinstance(m, LinearLayer_LoRA) for m in model.modules()):
            raise ValueError(f"--{role}_lora_dim {dim}: no nn.Linear of the {role} has {part!r} in its name "
                             f"(--{role}_lora_module_name; DeepSpeed-Chat's default fits OPT, Llama's layers are "
                             "'layers.'; GPT-2's Conv1D layers cannot take LoRA)")
        if optimize and step3_arg(self.args, "only_optimize_lora"):
            model = only_optimize_lora_parameters(model, ["v_head.weight"] if role == "critic" else [])
            model = make_model_gradient_checkpointing_compatible(model)
        return model

    def _batch(self, config: dict[str, Any], gas: int) -> dict[str, Any]:
        micro = step3_arg(self.args, "per_device_training_batch_size")
        config["train_micro_batch_size_per_gpu"] = micro
        config["train_batch_size"] = micro * self._world * gas
        return config

    def _init_trained(self, model: nn.Module, role: str, stage: int, gas: int) -> ShardspeedEngine:
        from transformers import get_scheduler

        a = self.args
        hybrid = role == "actor" and step3_arg(a, "enable_hybrid_engine")
        if hybrid and step3_arg(a, "inference_tp_size") > 1 and stage != 3:
            raise ValueError(f"--inference_tp_size {step3_arg(a, 'inference_tp_size')} needs --actor_zero_stage 3 (as in "
                             f"DeepSpeed-Chat), got {stage}")
        config = self._batch(get_train_ds_config(
            offload=step3_arg(a, "offload"), dtype=step3_arg(a, "dtype"), stage=stage, enable_hybrid_engine=hybrid,
            inference_tp_size=step3_arg(a, "inference_tp_size"),
            release_inference_cache=step3_arg(a, "release_inference_cache"),
            pin_parameters=not step3_arg(a, "unpin_actor_parameters"),
            tp_gather_partition_size=step3_arg(a, "tp_gather_partition_size"),
            max_out_tokens=step3_arg(a, "max_prompt_seq_len") + step3_arg(a, "max_answer_seq_len"),
            enable_tensorboard=step3_arg(a, "enable_tensorboard"),
            enable_mixed_precision_lora=step3_arg(a, "enable_mixed_precision_lora"),
            tb_path=step3_arg(a, "tensorboard_path"), tb_name=f"step3_{role}"), gas)
        groups = get_optimizer_grouped_parameters(model, step3_arg(a, f"{role}_weight_decay"),
                                                  step3_arg(a, f"{role}_lora_learning_rate"))
        adam = DeepSpeedCPUAdam if step3_arg(a, "offload") else FusedAdam
        optimizer = adam(groups, lr=step3_arg(a, f"{role}_learning_rate"), betas=(0.9, 0.95))
        scheduler = get_scheduler(name=step3_arg(a, "lr_scheduler_type"), optimizer=optimizer,
                                  num_warmup_steps=step3_arg(a, "num_warmup_steps"),
                                  num_training_steps=self.num_total_iters)
        engine, *_ = initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
        return engine

    def _init_frozen(self, model: nn.Module, stage: int, offload: bool, gas: int) -> ShardspeedEngine:
        config = self._batch(get_eval_ds_config(offload=offload, dtype=step3_arg(self.args, "dtype"), stage=stage), gas)
        engine, *_ = initialize(model=model, config=config)
        return engine


__all__ = ["DeepSpeedRLHFEngine"]
