"""DeepSpeed-Chat's PPO formulas (`dschat/rlhf/ppo_trainer.py`) as pure functions of tensors.

Shapes: B rows, L = sequence length (prompt P + answer), prompts left-padded to exactly P columns.
Per-action tensors (log-probs, values, rewards) have L - 1 columns: action t emits token t + 1.
`start = P - 1` is the first action of the answer; `action_mask = attention_mask[:, 1:]`.
The trainer's methods of the same names call these with its hyper-parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_log_probs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[label] per position: [B, T, V] x [B, T] -> [B, T]."""
    log_probs = F.log_softmax(logits, dim=-1)
    return log_probs.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)


def answer_ends(start: int, action_mask: Tensor) -> Tensor:
    """DeepSpeed-Chat's `ends`: start + (number of unmasked answer actions) + 1, per row.

    With pad == eos the action at `ends - 1` is the one that emits the first pad (the end of the answer).
    """
    return start + action_mask[:, start:].sum(1) + 1


def compute_rewards(start: int, log_probs: Tensor, ref_log_probs: Tensor, reward_score: Tensor, action_mask: Tensor,
                    kl_ctl: float, clip_reward_value: float) -> Tensor:
    """KL-shaped per-action rewards: -kl_ctl * (logp - ref_logp) everywhere, plus the clipped score at the end.

    The score lands on action `min(ends, L - 1) - 1` (DeepSpeed-Chat writes `rewards[j, start:ends[j]][-1]`):
    the action that emits the first pad, or the last action when the answer fills the maximum length.
    """
    rewards = -kl_ctl * (log_probs - ref_log_probs)
    ends = answer_ends(start, action_mask)
    last = torch.clamp(ends, max=rewards.shape[1]) - 1
    clipped = torch.clamp(reward_score, -clip_reward_value, clip_reward_value)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += clipped.to(rewards.dtype)
    return rewards


def zero_after_end(rewards: Tensor, values: Tensor, start: int, action_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Rewards and values with every position from `ends` on set to 0 (DeepSpeed-Chat does this in place
    before GAE, "otherwise the advantage/return will be wrong"); new tensors, the inputs are untouched."""
    ends = answer_ends(start, action_mask)
    keep = torch.arange(rewards.shape[1], device=rewards.device)[None, :] < ends[:, None]
    return torch.where(keep, rewards, 0.0), torch.where(keep, values, 0.0)


def get_advantages_and_returns(values: Tensor, rewards: Tensor, start: int, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE from `start` to the end (trlx's, as DeepSpeed-Chat): no whitening; V after the last action is 0.

    Returns (advantages [B, T - start], detached; returns = advantages + values[:, start:]).
    """
    last_gae: Tensor | float = 0.0
    reversed_advantages = []
    length = rewards.shape[-1]
    for t in reversed(range(start, length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_advantages.append(last_gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values[:, start:]
    return advantages.detach(), returns


def actor_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, cliprange: float) -> Tensor:
    """Clipped policy loss: sum(max(-A r, -A clip(r, 1 -+ cliprange)) * mask) / sum(mask), r = exp((logp - old) * mask)."""
    ratio = torch.exp((logprobs - old_logprobs) * mask)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    return torch.sum(torch.max(loss1, loss2) * mask) / mask.sum()


def critic_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float,
                compute_fp32_loss: bool = False) -> Tensor:
    """Clipped value loss: 0.5 * sum(max((v - G)^2, (clip(v, old -+ c) - G)^2) * mask) / sum(mask)."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    if compute_fp32_loss:
        values, clipped = values.float(), clipped.float()
    loss1 = (values - returns) ** 2
    loss2 = (clipped - returns) ** 2
    return 0.5 * torch.sum(torch.max(loss1, loss2) * mask) / mask.sum()


__all__ = ["actor_loss", "answer_ends", "compute_rewards", "critic_loss", "gather_log_probs", "get_advantages_and_returns",
           "zero_after_end"]
