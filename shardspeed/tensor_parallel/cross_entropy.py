"""Cross-entropy over vocabulary-sharded logits, without ever forming the full logits.

Each rank holds logits for vocabulary rows [start, end). Per token, three scalars cross the
tensor-parallel group: the max logit (for a stable softmax), the sum of exponentials and the
target's logit (from the one rank that owns it). The backward is local: softmax minus one-hot.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..comm.topology import AxisGroup


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, tp: AxisGroup,
                ignore_index: int) -> torch.Tensor:
        shifted = logits.float()
        peak = shifted.max(dim=-1).values
        if tp.size > 1:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=tp.group)
        shifted = shifted - peak.unsqueeze(-1)
        local_vocab = shifted.shape[-1]
        owned = (target >= vocab_start) & (target < vocab_start + local_vocab)
        local_target = (target - vocab_start).masked_fill(~owned, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~owned, 0.0)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if tp.size > 1:
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=tp.group)
            target_logit, sum_exp = both[0], both[1]
        ignored = target == ignore_index
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # now the softmax, kept for backward
        ctx.save_for_backward(exp, local_target, owned & ~ignored, ignored)
        ctx.logits_dtype = logits.dtype
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        if ctx.consumed:
            raise RuntimeError("vocab_parallel_cross_entropy: a second backward through the same loss is not supported "
                               "(the saved softmax becomes the gradient in place, to keep one logits-sized buffer)")
        ctx.consumed = True
        softmax, local_target, hit, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, tp: AxisGroup,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy (same shape as `target`; 0 where target == ignore_index) from this
    rank's logits [..., vocab_end - vocab_start]; every rank of `tp` gets the same values."""
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree: "
                         "logits must be target's shape plus the (sharded) vocabulary dimension")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, tp, ignore_index)


class CausalLMLoss:
    """Hugging Face's causal-LM loss (`ForCausalLMLoss`: shift, ignore -100, mean or sum / num_items_in_batch)
    over vocabulary-sharded logits; AutoTP installs it as the model's `loss_function`."""

    def __init__(self, vocab_start: int, tp: AxisGroup) -> None:
        self.vocab_start, self.tp = vocab_start, tp

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None,
                 num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = -100,
                 shift_labels: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        if shift_labels is None:
            labels = torch.nn.functional.pad(labels.to(logits.device), (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        shift_labels = shift_labels.reshape(-1).to(logits.device)
        per_token = vocab_parallel_cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels,
                                                 self.vocab_start, self.tp, ignore_index)
        if num_items_in_batch is not None:
            return per_token.sum() / num_items_in_batch
        return per_token.sum() / (shift_labels != ignore_index).sum()
