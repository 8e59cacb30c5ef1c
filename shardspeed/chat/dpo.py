"""DPO as DeepSpeed-Chat's step-2 alternative does it (`training/step2_dpo_finetuning/main.py`).

A batch is chosen rows then rejected rows (pair i = rows i and i + B), right-padded. Per row, the
sequence log-prob sums log p(ids[t] | ids[<t]) for t >= 1 over the positions of `label_mask`: not pad,
and not before the pair's first differing token (so the shared prompt does not count; a pair with no
difference counts every non-pad token). With pad == eos the EOS token is masked out too, as in
DeepSpeed-Chat. Then, with beta and eps = label_smoothing:

    z = beta * ((logp_c - ref_logp_c) - (logp_r - ref_logp_r))
    loss = mean(-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z))
    chosen_rewards = beta * (logp_c - ref_logp_c), rejected_rewards = beta * (logp_r - ref_logp_r)

`DPOTrainer(model, ref_model, pad_token_id, beta=0.1, label_smoothing=0.0).step(batch)` runs one update
of a shardspeed engine against a frozen reference (an engine or a plain module).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ppo_formulas import gather_log_probs


def dpo_label_mask(input_ids: Tensor, pad_id: int) -> Tensor:
    """1 where a token counts: not pad, and not before its pair's first differing position."""
    pairs = input_ids.shape[0] // 2
    differ = input_ids[:pairs] != input_ids[pairs:]
    first = torch.where(differ.any(dim=1), differ.int().argmax(dim=1), 0).repeat(2)
    before = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < first[:, None]
    return ((input_ids != pad_id) & ~before).long()


def batch_logps(logits: Tensor, input_ids: Tensor, label_mask: Tensor) -> Tensor:
    """Per row: sum over t >= 1 of log p(ids[t]) under logits[t - 1], times label_mask[t]."""
    labels = input_ids * label_mask  # masked positions gather token 0; their terms are multiplied by 0
    per_token = gather_log_probs(logits[:, :-1, :], labels[:, 1:])
    return (per_token * label_mask[:, 1:]).sum(-1)


def dpo_loss(logps: Tensor, ref_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """DPO on chosen rows then rejected rows' sequence log-probs: {"loss", "chosen_rewards", "rejected_rewards"}."""
    pairs = logps.shape[0] // 2
    chosen = logps[:pairs] - ref_logps[:pairs]
    rejected = logps[pairs:] - ref_logps[pairs:]
    z = beta * (chosen - rejected)
    loss = (-F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing).mean(0)
    return {"loss": loss, "chosen_rewards": beta * chosen.detach(), "rejected_rewards": beta * rejected.detach()}


class DPOTrainer:
    """One DPO update per `step(batch)` of `model` (a shardspeed engine) against the frozen `ref_model`."""

    def __init__(self, model: Any, ref_model: nn.Module, pad_token_id: int, beta: float = 0.1,
                 label_smoothing: float = 0.0) -> None:
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing {label_smoothing}: DPO's conservative smoothing takes 0 <= eps < 0.5")
        self.model, self.ref_model, self.pad_token_id = model, ref_model, pad_token_id
        self.beta, self.label_smoothing = beta, label_smoothing

    def step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """batch: `input_ids` (and `attention_mask`), chosen rows then rejected rows. Backward and step on the model."""
        input_ids = batch["input_ids"]
        if input_ids.shape[0] % 2:
            raise ValueError(f"a DPO batch is chosen rows then rejected rows: an even number of rows, got {input_ids.shape[0]}")
        label_mask = dpo_label_mask(input_ids, self.pad_token_id)
        logits = self.model(**batch, use_cache=False).logits
        with torch.no_grad():
            ref_logits = self.ref_model(**batch).logits
        out = dpo_loss(batch_logps(logits, input_ids, label_mask), batch_logps(ref_logits, input_ids, label_mask),
                       self.beta, self.label_smoothing)
        self.model.backward(out["loss"])
        self.model.step()
        return out


__all__ = ["DPOTrainer", "batch_logps", "dpo_label_mask", "dpo_loss"]
