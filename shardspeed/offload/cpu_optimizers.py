"""ZeRO-Offload's CPU optimizers and DeepSpeed's FusedAdam, under DeepSpeed's names and signatures.

DeepSpeed JIT-compiles its own AVX kernels for ``DeepSpeedCPUAdam`` and friends.  torch already
ships fused CPU kernels for Adam, AdamW and Adagrad (``torch._fused_adam_``, ``_fused_adamw_``,
``_fused_adagrad_``): one pass over parameter, gradient and state, threaded by torch's intra-op
pool.  On 2 cores at 100M fp32 parameters the Adam kernel moves 28-34 GB/s (28 bytes/parameter),
1.6-2.2x what a plain tensor copy reaches, and steps 1.05-1.15x as many parameters/s as DeepSpeed
0.19.8's op (1.27-1.29x at 10M; three noisy runs of ``benchmarks/bench_cpu_adam.py``).  So these
classes call the kernels directly and add only what DeepSpeed's API promises on top:

* parameters must be CPU tensors (DeepSpeed says so too), checked when a group is added and at
  every step;
* ``fp32_optimizer_states``: 16-bit parameters keep fp32 states.  The kernels need one dtype per
  call, so such a parameter is stepped through an fp32 copy of itself and its gradient, one
  tensor at a time (transient memory: 8 bytes per element of the largest such tensor);
* ``step(fp16_param_groups=...)`` copies the updated parameters into 16-bit tensors;
* ``step(grad_scale=s)`` divides the gradients by ``s`` inside the kernel, so ZeRO-Offload folds
  its unscale/clip factor into the step instead of a separate pass over the gradients.

The kernels index memory linearly: on CPU, torch 2.13's fused Adam silently mis-updates when a
gradient's strides differ from its parameter's.  Every tensor handed to a kernel here is
therefore contiguous; anything else goes through a contiguous copy.

State keys are torch's (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, Adagrad's ``sum``; a
float32 tensor ``step``), so a checkpoint loads into ``torch.optim.AdamW`` / ``Adagrad`` and back.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim.adagrad import adagrad as _torch_adagrad

from shardspeed.optim.lamb import _check_hparams
from shardspeed.optim.lion import Lion

ModelParameters = Iterable[Tensor] | Iterable[dict[str, Any]]

__all__ = ["DeepSpeedCPUAdagrad", "DeepSpeedCPUAdam", "DeepSpeedCPULion", "FusedAdam"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _KernelOptimizer(torch.optim.Optimizer):
    """Steps parameters with a multi-tensor kernel that needs contiguous tensors of one dtype.

    Subclasses implement :meth:`_update` for a list of same-device, same-dtype tensors and may
    choose the state dtype per parameter (:meth:`_state_dtype`).
    """

    _tensor_step = True  # state["step"] is a float32 tensor (torch's fused layout), not an int

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return p.dtype

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], grad_scale: Tensor | None) -> None:
        raise NotImplementedError

    def _step_group(self, group: dict[str, Any], grad_scale: Tensor | None) -> None:
        """Update every parameter of ``group`` that has a gradient, in place."""
        direct: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            dtype = self._state_dtype(p)
            grad = _kernel_tensor(p.grad, dtype)
            if p.dtype == dtype and p.is_contiguous():
                params, grads = direct.setdefault((p.device, dtype), ([], []))
                params.append(p)
                grads.append(grad)
            else:  # staged through a copy, one tensor at a time to bound the extra memory
                work = _kernel_tensor(p, dtype)
                self._update(group, [work], [grad], [self.state[p]], grad_scale)
                p.copy_(work)
        for params, grads in direct.values():
            self._update(group, params, grads, [self.state[p] for p in params], grad_scale)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a torch.optim checkpoint lacks DeepSpeed's group keys
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except that states keep their own dtype (fp32 for 16-bit parameters).

        ``torch.optim.Optimizer.load_state_dict`` casts floating state to the parameter's dtype,
        which would round fp32 moments of a bf16 parameter to bf16.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in state_dict["state"]:
                self.state[p] = {k: self._restored(k, v, p) for k, v in state_dict["state"][pid].items()}

    def _restored(self, key: str, value: Any, p: Tensor) -> Any:
        if key == "step":
            return torch.tensor(float(value), dtype=torch.float32, device=p.device) if self._tensor_step else int(value)
        if isinstance(value, Tensor):
            return _contiguous_copy(value, self._state_dtype(p), p.device)
        return value


class _CPUOptimizer(_KernelOptimizer):
    """What the DeepSpeedCPU* optimizers share: CPU parameters only, fp32 states for 16-bit
    parameters, and DeepSpeed's ``step(closure, fp16_param_groups)``."""

    fp32_optimizer_states: bool

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _require_cpu(type(self).__name__, self.param_groups[-1]["params"], len(self.param_groups) - 1)

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        return torch.float32 if self.fp32_optimizer_states and p.dtype in _LOW_PRECISION else p.dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None,
             fp16_param_groups: Sequence[Sequence[Tensor]] | None = None, *,
             grad_scale: float | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss.

        ``fp16_param_groups``: 16-bit tensors shaped like ``param_groups`` (a list per group, a
        tensor per parameter); each updated parameter is copied into its counterpart, as in
        DeepSpeed.  ``grad_scale``: divide the gradients by this inside the kernel (ZeRO folds
        its loss-scale and clipping factor in here); the gradients may be left divided.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = _scale_tensor(grad_scale)
        _check_copy_targets(fp16_param_groups, self.param_groups)
        for index, group in enumerate(self.param_groups):
            _require_cpu(type(self).__name__, group["params"], index)
            self._step_group(group, scale)
            if fp16_param_groups is not None:
                for p, target in zip(group["params"], fp16_param_groups[index]):
                    if p.grad is not None:
                        target.copy_(p)
        return loss


class DeepSpeedCPUAdam(_CPUOptimizer):
    """Adam (``adamw_mode=False``: L2 decay added to the gradient) or AdamW (decoupled decay) on
    CPU tensors, with DeepSpeed's signature and defaults.

    Same results as ``torch.optim.AdamW`` / ``Adam`` (it runs their fused kernel); ``adamw_mode``
    is stored per group as ``decoupled_weight_decay``, torch's key.
    ``bias_correction=False`` drops both bias corrections, as DeepSpeed's kernel does.
    ``amsgrad=True`` is torch's AMSGrad; DeepSpeed refuses it.  State: ``step``, ``exp_avg``,
    ``exp_avg_sq`` (and ``max_exp_avg_sq``), fp32 for 16-bit parameters unless
    ``fp32_optimizer_states=False``.
    """

    def __init__(self, model_params: ModelParameters, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0,
                 amsgrad: bool = False, adamw_mode: bool = True, fp32_optimizer_states: bool = True) -> None:
        _check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.fp32_optimizer_states = fp32_optimizer_states
        super().__init__(model_params, _adam_defaults(lr, bias_correction, betas, eps, weight_decay, amsgrad,
                                                      adamw_mode))

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], grad_scale: Tensor | None) -> None:
        _adam_update(group, params, grads, states, grad_scale)


class FusedAdam(_KernelOptimizer):
    """DeepSpeed's FusedAdam: torch's fused Adam/AdamW kernel on any device that has one (CPU, CUDA).

    ``adam_w_mode`` picks decoupled decay (AdamW) over L2 decay (Adam); it is stored per group as
    ``decoupled_weight_decay``, torch's key.  ``bias_correction=False``
    is :class:`~shardspeed.optim.factory.AdamNoBiasCorrection`'s update, run by the
    same kernel.  State is kept in the parameter dtype.  ``amsgrad=True`` is torch's AMSGrad
    (DeepSpeed refuses it).  ``set_grad_none`` is ``zero_grad()``'s default.
    """

    def __init__(self, params: ModelParameters, lr: float = 1e-3, bias_correction: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, adam_w_mode: bool = True,
                 weight_decay: float = 0.0, amsgrad: bool = False, set_grad_none: bool = True) -> None:
        _check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.set_grad_none = set_grad_none
        super().__init__(params, _adam_defaults(lr, bias_correction, betas, eps, weight_decay, amsgrad, adam_w_mode))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, grad_scale: float | None = None) -> Any:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss.

        ``grad_scale``: divide the gradients by this inside the kernel; they may be left divided.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scale = _scale_tensor(grad_scale)
        for group in self.param_groups:
            self._step_group(group, scale)
        return loss

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        super().zero_grad(self.set_grad_none if set_to_none is None else set_to_none)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], grad_scale: Tensor | None) -> None:
        _adam_update(group, params, grads, states, grad_scale)


def _adam_defaults(lr: float, bias_correction: bool, betas: tuple[float, float], eps: float, weight_decay: float,
                   amsgrad: bool, decoupled: bool) -> dict[str, Any]:
    """Group hyperparameters; the decay mode is kept under torch's key ``decoupled_weight_decay`` so
    that it travels with a checkpoint into ``torch.optim.Adam`` (which would otherwise assume L2)."""
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                amsgrad=amsgrad, decoupled_weight_decay=decoupled)


def _adam_update(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                 grad_scale: Tensor | None) -> None:
    """One fused Adam/AdamW step of same-device, same-dtype contiguous tensors.

    The kernel multiplies the step by ``1 / (1 - beta1**step)`` and the denominator's root by
    ``1 / sqrt(1 - beta2**step)``.  For ``bias_correction=False`` it is given step = +inf instead
    of the real count: ``beta**inf`` is exactly 0 for beta in [0, 1) (IEEE pow), so both factors
    are exactly 1 and the kernel computes the uncorrected update in its single pass.
    """
    if any(g.is_sparse for g in grads):
        raise ValueError("Adam does not support sparse gradients; use torch.optim.SparseAdam or DeepSpeedCPUAdagrad")
    amsgrad = group["amsgrad"]
    for p, state in zip(params, states):
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)  # torch's fused layout
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if amsgrad and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    steps = [s["step"] for s in states]
    torch._foreach_add_(steps, 1)
    if not group["bias_correction"]:
        steps = [torch.tensor(math.inf, dtype=torch.float32, device=p.device)] * len(params)
    if grad_scale is not None:
        grad_scale = grad_scale.to(params[0].device)
    beta1, beta2 = group["betas"]
    kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
    kernel(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
           [s["max_exp_avg_sq"] for s in states] if amsgrad else [], steps,
           lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
           amsgrad=amsgrad, maximize=False, grad_scale=grad_scale, found_inf=None)


class DeepSpeedCPUAdagrad(_CPUOptimizer):
    """Adagrad on CPU tensors with DeepSpeed's signature: torch's Adagrad without learning-rate
    decay, L2 weight decay added to the gradient.

    Dense gradients use torch's fused kernel; sparse ones (embeddings) torch's single-tensor
    path, which refuses ``weight_decay`` with sparse gradients.  DeepSpeed accepts and ignores
    ``amsgrad``; it is refused here rather than silently ignored.  State: ``step``, ``sum``.
    """

    def __init__(self, model_params: ModelParameters, lr: float = 1e-2, eps: float = 1e-10,
                 weight_decay: float = 0, amsgrad: bool = False, fp32_optimizer_states: bool = True) -> None:
        if amsgrad:
            raise ValueError("DeepSpeedCPUAdagrad(amsgrad=True): Adagrad has no AMSGrad variant "
                             "(DeepSpeed ignores the flag); remove it")
        _check_hparams(lr=lr, betas=(0.0, 0.0), eps=eps, weight_decay=weight_decay)
        self.fp32_optimizer_states = fp32_optimizer_states
        super().__init__(model_params, dict(lr=lr, eps=eps, weight_decay=weight_decay))

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], grad_scale: Tensor | None) -> None:
        for p, state in zip(params, states):
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["sum"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        hyper = dict(lr=group["lr"], lr_decay=0.0, weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=False)
        dense = [i for i, g in enumerate(grads) if not g.is_sparse]
        if dense:
            steps = [states[i]["step"] for i in dense]
            torch._foreach_add_(steps, 1)
            torch._fused_adagrad_([params[i] for i in dense], [grads[i] for i in dense],
                                  [states[i]["sum"] for i in dense], steps, **hyper,
                                  grad_scale=grad_scale, found_inf=None)
        for i in (i for i, g in enumerate(grads) if g.is_sparse):
            grad = grads[i] if grad_scale is None else grads[i] / grad_scale
            _torch_adagrad([params[i]], [grad], [states[i]["sum"]], [states[i]["step"]],
                           fused=False, foreach=False, has_sparse_grad=True, **hyper)


class DeepSpeedCPULion(_CPUOptimizer, Lion):
    """Lion on CPU tensors with DeepSpeed's signature: shardspeed's
    :class:`~shardspeed.optim.lion.Lion` rule, with fp32 momentum for 16-bit
    parameters.  State: ``step`` (int), ``exp_avg``."""

    _tensor_step = False

    def __init__(self, model_params: ModelParameters, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0, fp32_optimizer_states: bool = True) -> None:
        self.fp32_optimizer_states = fp32_optimizer_states
        super().__init__(model_params, lr=lr, betas=betas, weight_decay=weight_decay)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], grad_scale: Tensor | None) -> None:
        if grad_scale is not None:
            torch._foreach_div_(grads, grad_scale)
        # Lion's rule reads self.state[tensor]; an fp32 copy of a 16-bit parameter borrows the
        # parameter's state dict for the call (so its momentum is created, and stays, in fp32).
        borrowed = [w for w, s in zip(params, states) if self.state.get(w) is not s]
        for w, s in zip(params, states):
            self.state[w] = s
        try:
            self._update_bucket(group, params, grads)
        finally:
            for w in borrowed:
                del self.state[w]


def _kernel_tensor(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` itself if a kernel can use it (contiguous, of ``dtype``), else a contiguous copy."""
    if t.is_sparse:
        return t if t.dtype == dtype else t.to(dtype)
    if t.dtype == dtype and t.is_contiguous():
        return t
    return _contiguous_copy(t, dtype, t.device)


def _contiguous_copy(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Not t.to(dtype, memory_format=torch.contiguous_format): when dtype and device already
    # match, torch 2.13 returns t itself, strides and all.
    return torch.empty(t.shape, dtype=dtype, device=device).copy_(t)


def _scale_tensor(grad_scale: float | None) -> Tensor | None:
    """The fused kernels take the divisor as a float32 tensor."""
    if grad_scale is None:
        return None
    if not (math.isfinite(grad_scale) and grad_scale > 0):
        raise ValueError(f"grad_scale={grad_scale!r}: must be a finite number > 0 (the gradients are divided by it)")
    return torch.tensor(float(grad_scale), dtype=torch.float32)


def _require_cpu(name: str, params: Iterable[Tensor], group_index: int) -> None:
    for i, p in enumerate(params):
        if p.device.type != "cpu":
            raise ValueError(
                f"{name} steps CPU tensors, but parameter {i} of param group {group_index} is on {p.device}: "
                "enable ZeRO-Offload (`zero_optimization.offload_optimizer.device: \"cpu\"`) so the optimizer "
                "holds CPU copies, or use FusedAdam for device parameters")


def _check_copy_targets(targets: Sequence[Sequence[Tensor]] | None, groups: list[dict[str, Any]]) -> None:
    """``fp16_param_groups`` must mirror ``param_groups``: a list per group, one tensor per parameter."""
    if targets is None:
        return
    if len(targets) != len(groups):
        raise ValueError(f"fp16_param_groups has {len(targets)} groups, the optimizer {len(groups)}")
    for gi, (group_targets, group) in enumerate(zip(targets, groups)):
        if len(group_targets) != len(group["params"]):
            raise ValueError(f"fp16_param_groups[{gi}] has {len(group_targets)} tensors, "
                             f"param group {gi} has {len(group['params'])}")
        for pi, (t, p) in enumerate(zip(group_targets, group["params"])):
            if t.shape != p.shape:
                raise ValueError(f"fp16_param_groups[{gi}][{pi}] has shape {tuple(t.shape)}, "
                                 f"the parameter {tuple(p.shape)}")
