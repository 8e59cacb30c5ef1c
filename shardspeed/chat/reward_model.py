"""DeepSpeed-Chat's reward model (`dschat/utils/model/reward_model.py`): a transformer and a scalar head.

`RewardModel(base_model, tokenizer, num_padding_at_beginning=0, compute_fp32_loss=False)` puts
`v_head = Linear(H, 1, bias=False)` on the transformer's last hidden states, giving one reward per
position, rho[b, t]. Its three ways of reading them:

- `forward(input_ids, attention_mask)` (training, DeepSpeed-Chat's): the first half of the rows are the
  chosen answers, the second half the rejected ones, pair i = rows (i, i + B). For each pair the loss is
  the mean of -logsigmoid(rho_c[t] - rho_r[t]) over t from the first position where the two rows differ
  to the later of their ends (the `num_padding_at_beginning`-th pad, 0-based; the row length if none);
  identical rows use the last position only. The loss is the mean over pairs. Returns
  {"loss", "chosen_mean_scores", "rejected_mean_scores"}, the scores being the "end scores": rho at the
  position before each row's end, i.e. the last non-pad token.
- `forward_value(input_ids, attention_mask, return_value_only=False, prompt_length=0)` (PPO's critic and
  reward): every position's value, and `chosen_end_scores`, the value at the last non-pad token of the
  answer (the first pad searched from `prompt_length` on, so left padding of the prompt is ignored).
- `score(input_ids, attention_mask)` (one batch, one score per row): the end score as `forward`
  computes it for each row. The DeepSpeed guide's section 11.3 calls the model on chosen and rejected
  batches separately and expects these scores: use `ScoringRewardModel`, whose `forward` is `score`
  (the guide's code then runs with its import line changed to
  `from shardspeed.chat.reward_model import ScoringRewardModel as RewardModel`). Its loss is the
  last-token Bradley-Terry loss, not DeepSpeed-Chat's span loss; both classes hold the same weights.

A causal LM given as `base_model` is used without its LM head (its `base_model` backbone);
DeepSpeed-Chat passes an `AutoModel`. Every read goes through the module's `__call__`, so hooks on the
reward model itself (ZeRO-3's) see each pass.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Output = Literal["pairs", "values", "scores"]


def end_positions(input_ids: Tensor, pad_id: int, num_padding_at_beginning: int = 0) -> Tensor:
    """Per row, the index of its `num_padding_at_beginning`-th pad (0-based), or the row length if fewer pads."""
    pads = input_ids == pad_id
    hit = pads & (pads.cumsum(dim=1) == num_padding_at_beginning + 1)
    length = torch.full_like(input_ids[:, 0], input_ids.shape[1])
    return torch.where(hit.any(dim=1), hit.int().argmax(dim=1), length)


def end_scores(input_ids: Tensor, rewards: Tensor, pad_id: int, num_padding_at_beginning: int = 0) -> Tensor:
    """rewards[b, end - 1]: the reward at each row's last token before its end (`end_positions`)."""
    ends = end_positions(input_ids, pad_id, num_padding_at_beginning)
    return rewards[torch.arange(rewards.shape[0], device=rewards.device), ends - 1]


def answer_end_scores(input_ids: Tensor, values: Tensor, pad_id: int, prompt_length: int) -> Tensor:
    """values[b, c - 1], c = the first pad at or after `prompt_length` (the row length if none)."""
    if prompt_length <= 1:
        raise ValueError(f"prompt_length must be greater than 1 to select the end score (got {prompt_length}); pass "
                         "the padded prompt length")
    answer_pads = input_ids[:, prompt_length:] == pad_id
    length = torch.full_like(input_ids[:, 0], input_ids.shape[1])
    ends = torch.where(answer_pads.any(dim=1), answer_pads.int().argmax(dim=1) + prompt_length, length)
    return values[torch.arange(values.shape[0], device=values.device), ends - 1]


def pairwise_span_loss(input_ids: Tensor, rewards: Tensor, pad_id: int, num_padding_at_beginning: int = 0,
                       compute_fp32_loss: bool = False) -> dict[str, Tensor]:
    """DeepSpeed-Chat's reward-model loss on chosen rows then rejected rows (see the module docstring)."""
    if input_ids.dim() != 2 or input_ids.shape[0] % 2:
        raise ValueError(f"the reward model's forward takes chosen rows then rejected rows: an even number of rows, "
                         f"got input_ids of shape {tuple(input_ids.shape)}; to score one batch call `score`")
    pairs, length = input_ids.shape[0] // 2, input_ids.shape[1]
    ends = end_positions(input_ids, pad_id, num_padding_at_beginning)
    total = torch.zeros((), dtype=torch.float32 if compute_fp32_loss else rewards.dtype, device=rewards.device)
    for i in range(pairs):
        chosen, rejected = input_ids[i], input_ids[pairs + i]
        differ = (chosen != rejected).nonzero().flatten()
        if len(differ) == 0:  # identical rows: DeepSpeed-Chat scores the last position only
            first, stop = length - 1, length
        else:
            first, stop = int(differ[0]), int(max(ends[i], ends[pairs + i]))
        if first == 0:
            raise ValueError(f"pair {i}: the chosen and rejected rows differ at their first token; DeepSpeed-Chat's "
                             "loss needs a shared first token (the prompt)")
        span_c, span_r = rewards[i, first:stop], rewards[pairs + i, first:stop]
        if compute_fp32_loss:
            span_c, span_r = span_c.float(), span_r.float()
        total = total + -F.logsigmoid(span_c - span_r).mean()
    scores = rewards[torch.arange(2 * pairs, device=rewards.device), ends - 1]
    return {"loss": total / pairs, "chosen_mean_scores": scores[:pairs], "rejected_mean_scores": scores[pairs:]}


def _backbone(model: nn.Module) -> nn.Module:
    """The transformer without a task head: a Hugging Face model's `base_model` when it differs from the model."""
    inner = getattr(model, "base_model", None)
    return inner if isinstance(inner, nn.Module) and inner is not model and hasattr(inner, "config") else model


def _hidden_size(config: Any) -> int:
    for attr in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):  # OPT projects to word_embed_proj_dim
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of {type(config).__name__}: it has none of word_embed_proj_dim, "
                     "hidden_size, n_embd, d_model")


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id; a clear error without one."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has no pad token: DeepSpeed-Chat sets tokenizer.pad_token = tokenizer.eos_token "
                         "(and padding_side='right') for every model but LLaMA, which gets an added '[PAD]' token")
    return int(pad)


class RewardModel(nn.Module):
    """DeepSpeed-Chat's reward / critic model (see the module docstring)."""

    _default_output: Output = "pairs"

    def __init__(self, base_model: nn.Module, tokenizer: Any, num_padding_at_beginning: int = 0,
                 compute_fp32_loss: bool = False) -> None:
        super().__init__()
        backbone = _backbone(base_model)
        self.config = backbone.config
        self.num_padding_at_beginning = num_padding_at_beginning
        self.v_head = nn.Linear(_hidden_size(self.config), 1, bias=False)  # registered first, as DeepSpeed-Chat does
        self.rwtransformer = backbone
        self.PAD_ID = pad_token_id(tokenizer)
        self.compute_fp32_loss = compute_fp32_loss
        self._output: Output | None = None  # set while a method reads the rewards through __call__

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.rwtransformer.gradient_checkpointing_enable(**kwargs)  # type: ignore[operator]

    def gradient_checkpointing_disable(self) -> None:
        self.rwtransformer.gradient_checkpointing_disable()  # type: ignore[operator]

    def forward(self, input_ids: Tensor | None = None, past_key_values: Any = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, head_mask: Tensor | None = None, inputs_embeds: Tensor | None = None,
                use_cache: bool = False) -> Any:
        """DeepSpeed-Chat's `forward` (the pairwise loss dict); `ScoringRewardModel`'s returns `score`."""
        rewards = self._rewards(input_ids, past_key_values, attention_mask, position_ids, head_mask, inputs_embeds, use_cache)
        output = self._output or self._default_output
        if output == "values":
            return rewards
        if input_ids is None:
            raise ValueError("the reward model's loss and scores read the pads of input_ids: pass input_ids")
        if output == "scores":
            return end_scores(input_ids, rewards, self.PAD_ID, self.num_padding_at_beginning)
        return pairwise_span_loss(input_ids, rewards, self.PAD_ID, self.num_padding_at_beginning, self.compute_fp32_loss)

    def forward_value(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                      past_key_values: Any = None, position_ids: Tensor | None = None, head_mask: Tensor | None = None,
                      inputs_embeds: Tensor | None = None, return_value_only: bool = False, prompt_length: int = 0,
                      use_cache: bool = False) -> Any:
        """Per-position values [B, L]; unless `return_value_only`, a dict with them and `chosen_end_scores` [B]."""
        values = self._call("values", input_ids, past_key_values, attention_mask, position_ids, head_mask, inputs_embeds,
                            use_cache)
        if return_value_only:
            return values
        if input_ids is None:
            raise ValueError("forward_value's end scores read the pads of input_ids: pass input_ids")
        return {"values": values, "chosen_end_scores": answer_end_scores(input_ids, values, self.PAD_ID, prompt_length)}

    def score(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """One score per row of one batch: the reward at its last token before its end (DeepSpeed-Chat's end score)."""
        return self._call("scores", input_ids, None, attention_mask, None, None, None, False)

    def pair_loss(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """DeepSpeed-Chat's `forward` on chosen rows then rejected rows, whatever this class's `forward` returns."""
        return self._call("pairs", input_ids, None, attention_mask, None, None, None, False)

    def _call(self, output: Output, *args: Any) -> Any:
        self._output = output
        try:
            return self(*args)
        finally:
            self._output = None

    def _rewards(self, input_ids: Tensor | None, past_key_values: Any, attention_mask: Tensor | None,
                 position_ids: Tensor | None, head_mask: Tensor | None, inputs_embeds: Tensor | None,
                 use_cache: bool) -> Tensor:
        optional = {"past_key_values": past_key_values, "position_ids": position_ids, "head_mask": head_mask}
        kwargs = {k: v for k, v in optional.items() if v is not None}
        outputs = self.rwtransformer(input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                     use_cache=use_cache, **kwargs)
        return self.v_head(outputs[0]).squeeze(-1)


class ScoringRewardModel(RewardModel):
    """`RewardModel` whose `forward(input_ids, attention_mask)` returns one score per row (`score`), for code
    that scores chosen and rejected batches separately (the DeepSpeed guide's section 11.3)."""

    _default_output: Output = "scores"


__all__ = ["RewardModel", "ScoringRewardModel", "answer_end_scores", "end_positions", "end_scores", "pad_token_id",
           "pairwise_span_loss"]
