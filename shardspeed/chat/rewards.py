"""Rewards written as Python functions (programmatic, verifiable rewards), for PPO and GRPO.

A reward function takes `(prompt_ids [B, P], answer_ids [B, A], answer_mask [B, A])` and returns one
score per row (a tensor or a sequence of floats); `answer_mask` is 1 on the answer's own tokens.
`CallableReward(fn)` makes one usable where DeepSpeed-Chat's PPO expects the reward model: it has
`forward_value(..., prompt_length=P)["chosen_end_scores"]` and no parameters (the RLHF engine then
builds no engine for it).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn


RewardFunction = Callable[[Tensor, Tensor, Tensor], Union[Tensor, Sequence[float]]]
"""(prompt_ids, answer_ids, answer_mask) -> one score per row."""


def score_rows(fn: RewardFunction, prompt_ids: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """`fn`'s scores as a float32 tensor [B] on the prompts' device; a clear error if it returns the wrong number."""
    scores = torch.as_tensor(fn(prompt_ids, answer_ids, answer_mask), dtype=torch.float32, device=prompt_ids.device)
    if scores.shape != (prompt_ids.shape[0],):
        raise ValueError(f"the reward function returned shape {tuple(scores.shape)} for {prompt_ids.shape[0]} rows; "
                         "it must return one score per row")
    return scores


class CallableReward(nn.Module):
    """A reward function in the reward model's place (see the module docstring); `pad_token_id` marks the answer's end."""

    def __init__(self, fn: RewardFunction, pad_token_id: int) -> None:
        super().__init__()
        self.fn = fn
        self.PAD_ID = pad_token_id

    def forward_value(self, input_ids: Tensor, attention_mask: Tensor | None = None, return_value_only: bool = False,
                      prompt_length: int = 0, **unused: Any) -> dict[str, Tensor]:
        if return_value_only:
            raise ValueError("a reward function gives one score per answer, not per-position values; it cannot be the critic")
        answers = input_ids[:, prompt_length:]
        scores = score_rows(self.fn, input_ids[:, :prompt_length], answers, (answers != self.PAD_ID).long())
        return {"chosen_end_scores": scores}


__all__ = ["CallableReward", "RewardFunction", "score_rows"]
