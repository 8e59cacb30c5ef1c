"""LAMB with the semantics of DeepSpeed's `FusedLamb`, vectorised with `torch._foreach_*` ops.

Written from the published algorithm (You et al., "Large Batch Optimization for Deep Learning",
2019) and DeepSpeed's documented parameter set; the rule below is the contract.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

# Added to the gradient norm before dividing by max_grad_norm, so that a zero norm never divides.
_CLIP_EPS = 1e-6


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments, then a per-tensor trust ratio that rescales the step.

    For each parameter tensor ``w`` with gradient ``g`` at its step ``t`` (``m``, ``v`` start at 0)::

        g  = g / c          c = max(1, (||G|| + 1e-6) / max_grad_norm) if max_grad_norm > 0 else 1,
                            G = every gradient of the parameter group (p.grad is not modified)
        m  = beta1 * m + (1 - beta1) * g
        v  = beta2 * v + (1 - beta2) * g * g
        u  = m / (sqrt(v) + eps)          (eps_inside_sqrt: m / sqrt(v + eps))
        u  = u + weight_decay * w         (decay inside the trust ratio, as in the paper)
        r  = clamp(||w|| / ||u||, min_coeff, max_coeff)   if ||w|| > 0 and ||u|| > 0, else 1
        w  = w - lr * k_t * r * u         k_t = sqrt(1 - beta2**t) / (1 - beta1**t) with
                                          bias_correction, else 1

    ``m`` and ``v`` themselves are not bias-corrected: the correction is the scalar ``k_t`` applied
    after the trust ratio, which is what DeepSpeed's kernel does (so at step 1 with the default
    betas the step is ``0.316 * lr * r * u``, not ``lr * r * u``).  ``get_lamb_coeffs()`` returns
    the ratios ``r`` of the last step.  State per tensor: ``step`` (int), ``exp_avg``,
    ``exp_avg_sq``.  ``amsgrad`` exists for signature compatibility and must be False.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        amsgrad: bool = False,
    ) -> None:
        if amsgrad:
            raise ValueError("Lamb does not support amsgrad=True (neither does DeepSpeed's FusedLamb)")
        _check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if max_grad_norm < 0:
            raise ValueError(f"invalid max_grad_norm {max_grad_norm}: must be >= 0 (0 turns clipping off)")
        if not 0 <= min_coeff <= max_coeff:
            raise ValueError(f"need 0 <= min_coeff <= max_coeff, got min_coeff={min_coeff}, max_coeff={max_coeff}")
        defaults = dict(lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
                        eps_inside_sqrt=eps_inside_sqrt, weight_decay=weight_decay,
                        max_grad_norm=max_grad_norm, max_coeff=max_coeff, min_coeff=min_coeff)
        super().__init__(params, defaults)
        # (positions in the flattened param order, ratios) for each bucket of the last step.
        self._last_coeffs: list[tuple[list[int], Tensor]] = []

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LAMB update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._last_coeffs = []
        offset = 0
        for group in self.param_groups:
            buckets = _buckets(group["params"], offset)
            offset += len(group["params"])
            if not buckets:
                continue
            clip = _clip_factor(group["max_grad_norm"], [b[2] for b in buckets.values()])
            for positions, params, grads in buckets.values():
                coeffs = self._update_bucket(group, params, grads, clip)
                self._last_coeffs.append((positions, coeffs))
        return loss

    def get_lamb_coeffs(self) -> list[float]:
        """Trust ratios of the last step, one per parameter that had a gradient, in param order."""
        pairs = [(pos, c) for positions, coeffs in self._last_coeffs
                 for pos, c in zip(positions, coeffs.tolist())]
        return [c for _, c in sorted(pairs)]

    def _update_bucket(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor] | tuple[Tensor, ...],
                       clip: Tensor | None) -> Tensor:
        """Apply the rule to tensors sharing a device and dtype; returns their trust ratios."""
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, step_sizes = self._advance_state(group, params)
        if clip is not None:
            grads = torch._foreach_div(grads, clip.to(grads[0].device))
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m + (1 - beta1) * (g - m)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        if group["eps_inside_sqrt"]:
            update = torch._foreach_add(exp_avg_sqs, group["eps"])
            torch._foreach_sqrt_(update)
        else:
            update = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(update, group["eps"])
        torch._foreach_reciprocal_(update)
        torch._foreach_mul_(update, exp_avgs)  # update = m / denom, in the denominator's buffer
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])
        w_norm = torch.stack(torch._foreach_norm(params))
        u_norm = torch.stack(torch._foreach_norm(update))
        ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
        coeffs = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        scale = coeffs * torch.tensor(step_sizes, dtype=coeffs.dtype, device=coeffs.device)
        torch._foreach_mul_(update, list((-scale).unbind()))
        torch._foreach_add_(params, update)
        return coeffs

    def _advance_state(self, group: dict[str, Any],
                       params: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[float]]:
        """Create missing state, count the step, and return the moments and each lr * k_t."""
        beta1, beta2 = group["betas"]
        exp_avgs, exp_avg_sqs, step_sizes = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = state["step"]
            k = (1 - beta2**t) ** 0.5 / (1 - beta1**t) if group["bias_correction"] else 1.0
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            step_sizes.append(group["lr"] * k)
        return exp_avgs, exp_avg_sqs, step_sizes


def _check_hparams(*, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise ValueError for a hyperparameter outside its domain (shared with Lion)."""
    if not lr >= 0:
        raise ValueError(f"invalid lr {lr}: must be >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"invalid betas {betas}: need two values in [0, 1)")
    if not eps >= 0:
        raise ValueError(f"invalid eps {eps}: must be >= 0")
    if not weight_decay >= 0:
        raise ValueError(f"invalid weight_decay {weight_decay}: must be >= 0")


def _buckets(params: list[Tensor], offset: int) -> dict[tuple[torch.device, torch.dtype],
                                                         tuple[list[int], list[Tensor], list[Tensor]]]:
    """Parameters with a gradient, split by (device, dtype) for the foreach kernels.

    Each bucket holds (positions in the optimizer's flattened order, params, grads in the
    parameter's dtype).
    """
    out: dict[tuple[torch.device, torch.dtype], tuple[list[int], list[Tensor], list[Tensor]]] = {}
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("this optimizer does not support sparse gradients")
        positions, ps, gs = out.setdefault((p.device, p.dtype), ([], [], []))
        positions.append(offset + i)
        ps.append(p)
        gs.append(p.grad if p.grad.dtype == p.dtype else p.grad.to(p.dtype))
    return out


def _clip_factor(max_grad_norm: float, grad_lists: list[list[Tensor]]) -> Tensor | None:
    """The divisor max(1, (||G|| + 1e-6) / max_grad_norm) over a group's gradients, or None."""
    if max_grad_norm <= 0:
        return None
    device = grad_lists[0][0].device
    # Accumulate in at least fp32 (fp16 squares overflow), and in fp64 when the grads are fp64.
    dtype = torch.promote_types(grad_lists[0][0].dtype, torch.float32)
    squares = [torch.stack(torch._foreach_norm(gs)).to(device, dtype).square().sum() for gs in grad_lists]
    norm = torch.stack(squares).sum().sqrt()
    return ((norm + _CLIP_EPS) / max_grad_norm).clamp(min=1.0)
