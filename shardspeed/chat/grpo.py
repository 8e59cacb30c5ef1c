"""GRPO (group relative policy optimisation) with TRL's formulas, on a shardspeed actor engine.

Each prompt is sampled `num_generations` times (n); a reward function (`rewards.RewardFunction`) scores
every answer; the advantage of answer i of a group is (r_i - mean(r)) / (std(r) + 1e-4) with the
Bessel-corrected std (`scale_rewards=False`: r_i - mean(r)), the same for all its tokens. A group whose
rewards are all equal gets advantage 0. The per-token loss, with the ratio rho = exp(logp - logp_old), is

    -min(rho * A, clip(rho, 1 - epsilon, 1 + epsilon_high) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)

(the KL term, TRL's k3 estimator, only with beta > 0 and a reference model), over the answer's tokens up
to and including its first EOS. Aggregation (`loss_type`): "grpo" = mean over each answer's tokens, then
over answers; "dapo" = sum over all tokens / number of tokens; "dr_grpo" = sum / (answers x
max_new_tokens). Log-probs use logits / temperature, as the sampler does. With `num_iterations` 1 the
old log-probs are the current ones (rho = 1, the gradient is the policy gradient); with more, they are
computed once before the updates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .ppo_formulas import gather_log_probs
from .rewards import RewardFunction, score_rows
from .utils import generate, unwrap

LossType = Literal["grpo", "dapo", "dr_grpo"]


@dataclass(kw_only=True)
class GRPOConfig:
    num_generations: int = 4
    """n: answers sampled per prompt (a group); at least 2."""
    max_new_tokens: int = 64
    """Answer length limit."""
    temperature: float = 1.0
    """Sampling temperature (also divides the logits of the log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling; 1.0 keeps every token."""
    top_k: int = 0
    """Top-k sampling; 0 keeps every token."""
    beta: float = 0.0
    """KL coefficient to the reference model; 0 needs no reference (TRL's default)."""
    epsilon: float = 0.2
    """Lower clip of the ratio (1 - epsilon); also the upper one unless epsilon_high is set."""
    epsilon_high: float | None = None
    """Upper clip (1 + epsilon_high); DAPO uses 0.28."""
    loss_type: LossType = "grpo"
    """How per-token losses are averaged (see the module docstring)."""
    scale_rewards: bool = True
    """Divide the group-centred rewards by the group's std (+ 1e-4)."""
    num_iterations: int = 1
    """Updates per batch of rollouts."""

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"GRPOConfig.num_generations {self.num_generations}: a group needs at least 2 answers "
                             "(the group's mean is the baseline)")
        if self.loss_type not in ("grpo", "dapo", "dr_grpo"):
            raise ValueError(f"GRPOConfig.loss_type {self.loss_type!r}: choose grpo, dapo or dr_grpo")
        if self.num_iterations < 1:
            raise ValueError(f"GRPOConfig.num_iterations {self.num_iterations}: at least 1")


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: bool = True, eps: float = 1e-4) -> Tensor:
    """Rewards of consecutive groups of `num_generations` rows, centred on their group's mean (and scaled)."""
    groups = rewards.view(-1, num_generations)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale_rewards:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1)


def completion_mask(completions: Tensor, eos_token_id: int | None) -> Tensor:
    """1 on each answer's tokens up to and including its first EOS (all of them when it has none)."""
    length = completions.shape[1]
    if eos_token_id is None:
        return torch.ones_like(completions)
    is_eos = completions == eos_token_id
    first = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), length)
    return (torch.arange(length, device=completions.device)[None, :] <= first[:, None]).long()


def grpo_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, epsilon: float = 0.2,
              epsilon_high: float | None = None, beta: float = 0.0, ref_logps: Tensor | None = None,
              loss_type: LossType = "grpo", max_completion_length: int | None = None) -> Tensor:
    """GRPO's loss over answer tokens (see the module docstring); logps [N, A], advantages [N], mask [N, A]."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    per_token = -torch.min(ratio * advantages[:, None], clipped * advantages[:, None])
    if beta > 0:
        if ref_logps is None:
            raise ValueError("GRPO with beta > 0 needs the reference model's log-probs")
        delta = ref_logps - logps
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    width = max_completion_length if max_completion_length is not None else mask.shape[1]
    return (per_token * mask).sum() / (mask.shape[0] * width)


class GRPOTrainer:
    """GRPO updates of `actor` (a shardspeed engine; the hybrid engine generates when enabled).

    `reward_fn(prompt_ids, answer_ids, answer_mask)` scores the answers; `ref` (an engine or a module) is
    needed when `config.beta > 0`. `eos_token_id` defaults to the actor's generation config's.
    """

    def __init__(self, actor: Any, reward_fn: RewardFunction, config: GRPOConfig, pad_token_id: int,
                 eos_token_id: int | None = None, ref: nn.Module | None = None) -> None:
        if config.beta > 0 and ref is None:
            raise ValueError(f"GRPOConfig.beta {config.beta} > 0 needs a reference model: pass ref=")
        self.actor, self.reward_fn, self.config, self.ref = actor, reward_fn, config, ref
        self.pad_token_id = pad_token_id
        if eos_token_id is None:
            eos_token_id = getattr(getattr(unwrap(actor), "generation_config", None), "eos_token_id", None)
        self.eos_token_id = eos_token_id[0] if isinstance(eos_token_id, (list, tuple)) else eos_token_id

    def step(self, prompts: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """Sample n answers per prompt (prompts left-padded), score them and update the actor; returns statistics."""
        c = self.config
        if mask is None:
            mask = prompts.ne(self.pad_token_id).long()
        prompts, mask = prompts.repeat_interleave(c.num_generations, 0), mask.repeat_interleave(c.num_generations, 0)
        self.actor.eval()
        seq = generate(self.actor, prompts, mask, max_new_tokens=c.max_new_tokens, do_sample=True,
                       temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, pad_token_id=self.pad_token_id,
                       eos_token_id=self.eos_token_id)
        self.actor.train()
        width = prompts.shape[1]
        answers = seq[:, width:]
        answer_mask = completion_mask(answers, self.eos_token_id)
        rewards = score_rows(self.reward_fn, prompts, answers, answer_mask)
        advantages = group_advantages(rewards, c.num_generations, c.scale_rewards)
        attention = torch.cat([mask, answer_mask], dim=1)
        with torch.no_grad():
            ref = self._logps(self.ref, seq, attention, width) if c.beta > 0 and self.ref is not None else None
            old = self._logps(self.actor, seq, attention, width) if c.num_iterations > 1 else None
        for _ in range(c.num_iterations):
            logps = self._logps(self.actor, seq, attention, width)
            loss = grpo_loss(logps, old if old is not None else logps.detach(), advantages, answer_mask, c.epsilon,
                             c.epsilon_high, c.beta, ref, c.loss_type, c.max_new_tokens)
            self.actor.backward(loss)
            self.actor.step()
        return {"loss": float(loss), "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                "answer_length": float(answer_mask.sum(1).float().mean())}

    def _logps(self, model: Any, seq: Tensor, attention: Tensor, width: int) -> Tensor:
        logits = model(seq, attention_mask=attention, use_cache=False).logits[:, width - 1:-1, :]
        return gather_log_probs(logits / self.config.temperature, seq[:, width:])


__all__ = ["GRPOConfig", "GRPOTrainer", "completion_mask", "group_advantages", "grpo_loss"]
