"""Per-sample, per-token reference transcriptions of DeepSpeed-Chat's RLHF formulas (and TRL's GRPO), written
with plain loops, independent of `shardspeed.chat`. Used by the unit tests of the formulas and by the plain-PyTorch
reference of a PPO / DPO iteration, so the losses and log-probs are built from 0-dim tensors (differentiable)."""
from __future__ import annotations

import math
import statistics
from typing import Callable

import torch
from torch import Tensor


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def log_probs(logits: Tensor, seq: Tensor) -> Tensor:
    """out[b, t] = logits[b, t, seq[b, t + 1]] - logsumexp(logits[b, t]), t = 0 .. L - 2 (differentiable)."""
    rows, length = seq.shape
    return torch.stack([torch.stack([logits[b, t, int(seq[b, t + 1])] - torch.logsumexp(logits[b, t], dim=0)
                                     for t in range(length - 1)]) for b in range(rows)])


def _kth_pad(ids: list[int], pad: int, k: int) -> int:
    pads = [i for i, tok in enumerate(ids) if tok == pad]
    return pads[k] if len(pads) > k else len(ids)


def reward_model_forward(input_ids: Tensor, rewards: Tensor, pad: int, k: int = 0) -> tuple[float, list[float], list[float]]:
    """DeepSpeed-Chat's RewardModel.forward: (loss, chosen end scores, rejected end scores)."""
    pairs = input_ids.shape[0] // 2
    total, chosen_scores, rejected_scores = 0.0, [], []
    for i in range(pairs):
        c_ids, r_ids = input_ids[i].tolist(), input_ids[pairs + i].tolist()
        c_rew, r_rew = [float(v) for v in rewards[i]], [float(v) for v in rewards[pairs + i]]
        c_ind = _kth_pad(c_ids, pad, k)
        diverge = [t for t in range(len(c_ids)) if c_ids[t] != r_ids[t]]
        if not diverge:
            end, first, r_ind = len(c_ids), len(c_ids) - 1, c_ind
        else:
            r_ind = _kth_pad(r_ids, pad, k)
            end, first = max(c_ind, r_ind), diverge[0]
        terms = [-_logsigmoid(c_rew[t] - r_rew[t]) for t in range(first, end)]
        total += sum(terms) / len(terms)
        chosen_scores.append(c_rew[c_ind - 1])
        rejected_scores.append(r_rew[r_ind - 1])
    return total / pairs, chosen_scores, rejected_scores


def forward_value_end_scores(input_ids: Tensor, values: Tensor, pad: int, prompt_length: int) -> list[float]:
    scores = []
    for b in range(input_ids.shape[0]):
        ids = input_ids[b].tolist()
        answer_pads = [t for t in range(prompt_length, len(ids)) if ids[t] == pad]
        end = answer_pads[0] if answer_pads else len(ids)
        scores.append(float(values[b, end - 1]))
    return scores


def compute_rewards(prompt_length: int, logp: Tensor, ref_logp: Tensor, score: Tensor, action_mask: Tensor,
                    kl_ctl: float, clip: float) -> Tensor:
    rows, actions = logp.shape
    start = prompt_length - 1
    out = torch.zeros(rows, actions, dtype=torch.float64)
    for b in range(rows):
        for t in range(actions):
            out[b, t] = -kl_ctl * (float(logp[b, t]) - float(ref_logp[b, t]))
        answer_actions = sum(int(action_mask[b, t]) for t in range(start, actions))
        end = start + answer_actions + 1
        last = min(end, actions) - 1
        out[b, last] += min(max(float(score[b]), -clip), clip)
    return out


def zero_after_end(rewards: Tensor, values: Tensor, prompt_length: int, action_mask: Tensor) -> tuple[Tensor, Tensor]:
    rewards, values = rewards.clone().double(), values.clone().double()
    start = prompt_length - 1
    for b in range(rewards.shape[0]):
        end = start + sum(int(action_mask[b, t]) for t in range(start, action_mask.shape[1])) + 1
        for t in range(end, rewards.shape[1]):
            rewards[b, t] = 0.0
            values[b, t] = 0.0
    return rewards, values


def gae(values: Tensor, rewards: Tensor, start: int, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    rows, actions = rewards.shape
    adv = torch.zeros(rows, actions - start, dtype=torch.float64)
    for b in range(rows):
        running = 0.0
        for t in range(actions - 1, start - 1, -1):
            next_value = float(values[b, t + 1]) if t + 1 < actions else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t - start] = running
    returns = adv + values[:, start:].double()
    return adv, returns


def _masked_mean(mask: Tensor, term: Callable[[int, int, float], Tensor]) -> Tensor:
    """sum over (b, t) of term(b, t, m) * m / sum of m, m = mask[b, t]."""
    num: Tensor | float = 0.0
    den = 0.0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            m = float(mask[b, t])
            num = num + term(b, t, m) * m
            den += m
    return num / den  # type: ignore[return-value]


def actor_loss(logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, cliprange: float) -> Tensor:
    """`logp` may require grad; the rest are constants."""
    def term(b: int, t: int, m: float) -> Tensor:
        ratio = torch.exp((logp[b, t] - float(old[b, t])) * m)
        a = float(adv[b, t])
        return torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - cliprange, 1 + cliprange))

    return _masked_mean(mask, term)


def critic_loss(v: Tensor, old: Tensor, returns: Tensor, mask: Tensor, cliprange_value: float) -> Tensor:
    """`v` may require grad; the rest are constants."""
    def term(b: int, t: int, m: float) -> Tensor:
        previous, target = float(old[b, t]), float(returns[b, t])
        clipped = torch.clamp(v[b, t], previous - cliprange_value, previous + cliprange_value)
        return torch.maximum((v[b, t] - target) ** 2, (clipped - target) ** 2)

    return 0.5 * _masked_mean(mask, term)


def dpo(input_ids: Tensor, logits: Tensor, ref_logits: Tensor, pad: int, beta: float, eps: float) -> tuple[Tensor, list[float], list[float]]:
    """DeepSpeed-Chat's DPO step: (loss, differentiable in `logits`; chosen rewards; rejected rewards)."""
    pairs = input_ids.shape[0] // 2
    lp, ref_lp = log_probs(logits, input_ids), log_probs(ref_logits, input_ids).detach()

    def seq_logp(table: Tensor, row: int, first: int) -> Tensor:
        ids = input_ids[row].tolist()
        return sum((table[row, t - 1] for t in range(1, len(ids)) if ids[t] != pad and t >= first), torch.zeros(()))

    losses, chosen, rejected = [], [], []
    for i in range(pairs):
        c_ids, r_ids = input_ids[i].tolist(), input_ids[pairs + i].tolist()
        diverge = [t for t in range(len(c_ids)) if c_ids[t] != r_ids[t]]
        first = diverge[0] if diverge else 0
        c = seq_logp(lp, i, first) - seq_logp(ref_lp, i, first)
        r = seq_logp(lp, pairs + i, first) - seq_logp(ref_lp, pairs + i, first)
        z = beta * (c - r)
        losses.append(-(1 - eps) * torch.nn.functional.logsigmoid(z) - eps * torch.nn.functional.logsigmoid(-z))
        chosen.append(beta * c.item())
        rejected.append(beta * r.item())
    return torch.stack(losses).sum() / pairs, chosen, rejected


def grpo_advantages(rewards: list[float], n: int, scale: bool = True) -> list[float]:
    out = []
    for g in range(0, len(rewards), n):
        group = rewards[g:g + n]
        mean, std = statistics.mean(group), statistics.stdev(group)
        out += [(r - mean) / (std + 1e-4) if scale else r - mean for r in group]
    return out


def grpo_loss(logp: Tensor, old: Tensor, adv: list[float], mask: Tensor, eps_low: float, eps_high: float, beta: float,
              ref: Tensor | None, loss_type: str, max_len: int) -> float:
    per_row, total, tokens = [], 0.0, 0.0
    for b in range(logp.shape[0]):
        row_sum, row_tokens = 0.0, 0.0
        for t in range(logp.shape[1]):
            m = float(mask[b, t])
            ratio = math.exp(float(logp[b, t]) - float(old[b, t]))
            term = -min(ratio * adv[b], min(max(ratio, 1 - eps_low), 1 + eps_high) * adv[b])
            if beta > 0 and ref is not None:
                d = float(ref[b, t]) - float(logp[b, t])
                term += beta * (math.exp(d) - d - 1)
            row_sum += term * m
            row_tokens += m
        per_row.append(row_sum / max(row_tokens, 1.0))
        total += row_sum
        tokens += row_tokens
    if loss_type == "grpo":
        return sum(per_row) / len(per_row)
    if loss_type == "dapo":
        return total / max(tokens, 1.0)
    return total / (logp.shape[0] * max_len)
