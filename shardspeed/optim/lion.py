"""Lion with the semantics of DeepSpeed's `FusedLion` / `DeepSpeedCPULion`, on `torch._foreach_*` ops.

Written from the published algorithm (Chen et al., "Symbolic Discovery of Optimization
Algorithms", 2023); the rule below is the contract.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from shardspeed.optim.lamb import _buckets, _check_hparams


class Lion(torch.optim.Optimizer):
    """Lion: a sign update from an interpolated momentum, with decoupled weight decay.

    For each parameter tensor ``w`` with gradient ``g`` (momentum ``m`` starts at 0)::

        c = beta1 * m + (1 - beta1) * g
        w = w * (1 - lr * weight_decay) - lr * sign(c)
        m = beta2 * m + (1 - beta2) * g

    Defaults are DeepSpeed's (``betas=(0.9, 0.999)``; the paper suggests ``(0.9, 0.99)``).  Where
    ``c`` is exactly 0 the sign step is 0 (the paper's ``sign``); DeepSpeed's kernels move such an
    element by ``+lr`` (CUDA) or by ``-lr * copysign(1, c)`` (CPU), which only matters for
    elements whose gradient and momentum are both exactly zero.  State per tensor: ``step``
    (int, kept for checkpoint compatibility) and ``exp_avg``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
    ) -> None:
        _check_hparams(lr=lr, betas=betas, eps=0.0, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Lion update of every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for _, params, grads in _buckets(group["params"], 0).values():
                self._update_bucket(group, params, grads)
        return loss

    def _update_bucket(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Apply the rule to tensors sharing a device and dtype."""
        beta1, beta2 = group["betas"]
        lr, weight_decay = group["lr"], group["weight_decay"]
        exp_avgs = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            exp_avgs.append(state["exp_avg"])
        # lerp(a, b, w) = a + w * (b - a): one pass each for c and for the new m.
        direction = torch._foreach_lerp(grads, exp_avgs, beta1)
        torch._foreach_sign_(direction)
        if weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_add_(params, direction, alpha=-lr)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
