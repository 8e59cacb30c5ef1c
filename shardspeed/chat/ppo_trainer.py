"""DeepSpeed-Chat's PPO trainer (`dschat/rlhf/ppo_trainer.py`): `DeepSpeedPPOTrainer(rlhf_engine, args)`.

One iteration is `exp = trainer.generate_experience(prompts, mask, step)` then
`actor_loss, critic_loss = trainer.train_rlhf(exp)`; DeepSpeed-Chat's loop then calls
`train_unsupervised(batch, unsup_coef)` (PTX, `DeepSpeedPPOTrainerUnsupervised`) and the EMA update
(`update_ema()` here, `moving_average` in its main.py).

`generate_experience`: actor, critic, reference and reward to eval mode; the actor generates through its
engine (the hybrid engine's `generate` when enabled) up to `P + max_answer_seq_len` tokens; rows whose
answer has at most one non-pad token are dropped (if all are, the previous experience is reused);
then, in train mode as DeepSpeed-Chat does (dropout must be 0 for the first ratio to be 1), without
gradients: the actor's and the reference's log-probs of the sampled tokens, the reward model's score at
the answer's last non-pad token, and the critic's values. `train_rlhf`: KL-shaped rewards with the
clipped score on the answer's end action, rewards and values zeroed after the end, GAE, then the
clipped policy loss (actor backward + step) and the clipped value loss (critic backward + step). The
formulas are in `ppo_formulas`; the hyper-parameters are attributes (DeepSpeed-Chat hard-codes them):

| attribute | default | also from `args.` |
| --- | --- | --- |
| `kl_ctl`, `clip_reward_value`, `cliprange`, `cliprange_value`, `gamma`, `lam` | 0.1, 5, 0.2, 0.2, 1.0, 0.95 | same names |
| `do_sample`, `temperature`, `top_p`, `top_k` | None: the model's generation config (LLaMA: greedy, as DeepSpeed-Chat) | same names |

What differs from DeepSpeed-Chat: `mask=None` means "not pad" (the prompts are left-padded with the pad
token); when no rank can train (every answer empty at the first step) every rank raises the same clear
error instead of one rank asserting while the others wait in a collective; `align_overflow` is refused.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .arguments import step3_arg
from .ppo_formulas import (actor_loss, compute_rewards, critic_loss, gather_log_probs, get_advantages_and_returns,
                           zero_after_end)
from .reward_model import pad_token_id
from .utils import all_ranks_agree, generate, moving_average, unwrap

GENERATION_OPTIONS = ("do_sample", "temperature", "top_p", "top_k")


class DeepSpeedPPOTrainer:
    """PPO over a `DeepSpeedRLHFEngine` (see the module docstring). `engine=` is accepted for `rlhf_engine=`,
    as DeepSpeed-Chat's README writes it."""

    def __init__(self, rlhf_engine: Any = None, args: Any = None, *, engine: Any = None) -> None:
        rlhf_engine = rlhf_engine if rlhf_engine is not None else engine
        if rlhf_engine is None:
            raise ValueError("DeepSpeedPPOTrainer needs rlhf_engine= (a DeepSpeedRLHFEngine)")
        self.rlhf_engine = rlhf_engine
        self.actor_model = rlhf_engine.actor
        self.critic_model = rlhf_engine.critic
        self.ref_model = rlhf_engine.ref
        self.reward_model = rlhf_engine.reward
        self.tokenizer = rlhf_engine.tokenizer
        self.args = args
        self.pad_token_id = pad_token_id(self.tokenizer)
        self.max_answer_seq_len = int(step3_arg(args, "max_answer_seq_len"))
        self.z3_enabled = step3_arg(args, "actor_zero_stage") == 3
        self.compute_fp32_loss = bool(step3_arg(args, "compute_fp32_loss"))
        if step3_arg(args, "align_overflow"):
            raise ValueError("--align_overflow is not supported by shardspeed's PPO trainer; leave it off")
        self.last_generated_experience: dict[str, Tensor] | None = None
        self.kl_ctl = float(step3_arg(args, "kl_ctl"))
        self.clip_reward_value = float(step3_arg(args, "clip_reward_value"))
        self.cliprange = float(step3_arg(args, "cliprange"))
        self.cliprange_value = float(step3_arg(args, "cliprange_value"))
        self.gamma = float(step3_arg(args, "gamma"))
        self.lam = float(step3_arg(args, "lam"))
        self.do_sample: bool | None = step3_arg(args, "do_sample")
        self.temperature: float | None = step3_arg(args, "temperature")
        self.top_p: float | None = step3_arg(args, "top_p")
        self.top_k: int | None = step3_arg(args, "top_k")
        self.generate_time = 0.0
        self.prompt_length = 0

    # ---- experience ----------------------------------------------------------------------------------
    def generation_kwargs(self) -> dict[str, Any]:
        """The sampling options set on the trainer; LLaMA without one is greedy, as DeepSpeed-Chat forces."""
        kwargs = {name: getattr(self, name) for name in GENERATION_OPTIONS if getattr(self, name) is not None}
        if "do_sample" not in kwargs and getattr(unwrap(self.actor_model).config, "model_type", None) == "llama":
            kwargs["do_sample"] = False
        return kwargs

    def _generate_sequence(self, prompts: Tensor, mask: Tensor, step: int) -> Tensor | None:
        self.prompt_length = prompts.shape[1]
        seq = generate(self.actor_model, prompts, mask, max_length=self.max_answer_seq_len + self.prompt_length,
                       pad_token_id=self.pad_token_id, **self.generation_kwargs())
        answers = seq[:, self.prompt_length:]
        if step3_arg(self.args, "print_answers") and step % step3_arg(self.args, "print_answers_interval") == 0:
            decode = getattr(self.tokenizer, "batch_decode", None)
            if decode is not None:
                rank = dist.get_rank() if dist.is_initialized() else 0
                print(f"--- prompt --> step={step}, rank={rank}, {decode(prompts, skip_special_tokens=True)}")
                print(f"--- answer --> step={step}, rank={rank}, {decode(answers, skip_special_tokens=True)}")
        keep = (answers != self.pad_token_id).sum(dim=-1) > 1  # an answer of at most one token is dropped
        return seq[keep] if bool(keep.any()) else None

    def generate_experience(self, prompts: Tensor, mask: Tensor | None = None, step: int = 0) -> dict[str, Tensor]:
        """Roll out the prompts (left-padded to one length) and score them (see the module docstring)."""
        self.eval()
        if mask is None:
            mask = prompts.ne(self.pad_token_id).long()
        start = time.perf_counter()
        seq = self._generate_sequence(prompts, mask, step)
        self.generate_time = time.perf_counter() - start
        usable = seq is not None or self.last_generated_experience is not None
        if not all_ranks_agree(usable, prompts.device):
            raise RuntimeError(
                f"generate_experience(step={step}): the actor emits nothing: every answer it generated "
                f"{'here' if not usable else 'on another rank'} has at most one non-pad token, and there is no earlier "
                "experience to reuse. A pretrained checkpoint that stops at once (EOS = pad) does this: run supervised "
                "fine-tuning (step 1) on prompt + answer data first and start PPO from that actor")
        if seq is None:
            assert self.last_generated_experience is not None
            prompts, seq = self.last_generated_experience["prompts"], self.last_generated_experience["seq"]
        else:
            self.last_generated_experience = {"prompts": prompts, "seq": seq}
        self.train()
        attention_mask = seq.ne(self.pad_token_id).long()
        with torch.no_grad():
            logits = self.actor_model(seq, attention_mask=attention_mask).logits
            logits_ref = self.ref_model(seq, attention_mask=attention_mask).logits
            reward_score = unwrap(self.reward_model).forward_value(  # type: ignore[operator]
                seq, attention_mask, prompt_length=self.prompt_length)["chosen_end_scores"].detach()
            values = unwrap(self.critic_model).forward_value(  # type: ignore[operator]
                seq, attention_mask, return_value_only=True).detach()[:, :-1]
        if self.compute_fp32_loss:
            logits, logits_ref = logits.float(), logits_ref.float()
        return {"prompts": prompts, "logprobs": gather_log_probs(logits[:, :-1, :], seq[:, 1:]),
                "ref_logprobs": gather_log_probs(logits_ref[:, :-1, :], seq[:, 1:]), "value": values,
                "rewards": reward_score, "input_ids": seq, "attention_mask": attention_mask}

    # ---- the update ----------------------------------------------------------------------------------
    def compute_rewards(self, prompts: Tensor, log_probs: Tensor, ref_log_probs: Tensor, reward_score: Tensor,
                        action_mask: Tensor) -> Tensor:
        return compute_rewards(prompts.shape[1] - 1, log_probs, ref_log_probs, reward_score, action_mask,
                               self.kl_ctl, self.clip_reward_value)

    def get_advantages_and_returns(self, values: Tensor, rewards: Tensor, start: int) -> tuple[Tensor, Tensor]:
        return get_advantages_and_returns(values, rewards, start, self.gamma, self.lam)

    def actor_loss_fn(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        return actor_loss(logprobs, old_logprobs, advantages, mask, self.cliprange)

    def critic_loss_fn(self, values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
        return critic_loss(values, old_values, returns, mask, self.cliprange_value, self.compute_fp32_loss)

    def train_rlhf(self, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One PPO update of the actor, then of the critic, on one experience; returns (actor_loss, critic_loss)."""
        prompts, seq, attention_mask = inputs["prompts"], inputs["input_ids"], inputs["attention_mask"]
        log_probs = inputs["logprobs"]
        start = prompts.shape[-1] - 1
        action_mask = attention_mask[:, 1:]
        with torch.no_grad():
            rewards = self.compute_rewards(prompts, log_probs, inputs["ref_logprobs"], inputs["rewards"], action_mask)
            rewards, old_values = zero_after_end(rewards, inputs["value"], start, action_mask)
            advantages, returns = self.get_advantages_and_returns(old_values, rewards, start)

        batch = {"input_ids": seq, "attention_mask": attention_mask}
        logits = self.actor_model(**batch, use_cache=False).logits
        new_log_probs = gather_log_probs(logits[:, :-1, :], seq[:, 1:])
        loss_actor = self.actor_loss_fn(new_log_probs[:, start:], log_probs[:, start:], advantages, action_mask[:, start:])
        self.actor_model.backward(loss_actor)
        self.actor_model.step()

        value = unwrap(self.critic_model).forward_value(**batch, return_value_only=True, use_cache=False)[:, :-1]  # type: ignore[operator]
        loss_critic = self.critic_loss_fn(value[:, start:], old_values[:, start:], returns, action_mask[:, start:])
        self.critic_model.backward(loss_critic)
        self.critic_model.step()
        return loss_actor, loss_critic

    def update_ema(self) -> None:
        """The EMA actor's update (`enable_ema`): ema = 0.992 ema + 0.008 actor; DeepSpeed-Chat's loop does it after each `train_rlhf`."""
        if self.rlhf_engine.actor_ema is not None:
            moving_average(self.actor_model, self.rlhf_engine.actor_ema, zero_stage=step3_arg(self.args, "actor_zero_stage"))

    def get_overflow(self) -> tuple[bool, bool]:
        if step3_arg(self.args, "dtype") == "bf16":
            return False, False
        return (bool(getattr(self.actor_model.optimizer, "overflow", False)),
                bool(getattr(self.critic_model.optimizer, "overflow", False)))

    def train(self) -> None:
        self.actor_model.train()
        self.critic_model.train()

    def eval(self) -> None:
        self.actor_model.eval()
        self.critic_model.eval()
        self.reward_model.eval()
        self.ref_model.eval()


class DeepSpeedPPOTrainerUnsupervised(DeepSpeedPPOTrainer):
    """PPO with the pretraining loss mixed in (PTX): `train_unsupervised` after each `train_rlhf`."""

    def train_unsupervised(self, inputs: dict[str, Tensor], unsup_coef: float) -> Tensor:
        """The actor's language-model loss on `inputs` (with labels), scaled by `unsup_coef`: backward and step."""
        outputs = self.actor_model(**inputs, use_cache=False)
        loss = outputs.loss
        self.actor_model.backward(unsup_coef * loss)
        self.actor_model.step()
        return loss


__all__ = ["DeepSpeedPPOTrainer", "DeepSpeedPPOTrainerUnsupervised"]
