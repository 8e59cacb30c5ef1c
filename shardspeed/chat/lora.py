"""DeepSpeed-Chat's own LoRA (`dschat/utils/module/lora.py`; not peft's), with the same names and maths.

`LinearLayer_LoRA(weight, lora_dim, lora_scaling=1, lora_droppout=0, bias=None)` keeps the frozen
`weight` [out, in] and `bias`, and trains `lora_right_weight` [in, r] (Kaiming-uniform) and
`lora_left_weight` [r, out] (zeros): y = x W^T + b + dropout(x) R L * (lora_scaling / r).

What differs from DeepSpeed-Chat, on purpose: fusing never writes into the trained weight.
DeepSpeed-Chat's `fuse_lora_weight` does `weight.data += scaling * L^T R^T` and `unfuse_lora_weight`
subtracts it again, so in 16-bit every fuse/unfuse round trip can move the base weight by rounding.
Here `fuse_lora_weight` computes W + scaling L^T R^T into a separate tensor that the forward then uses,
and `unfuse_lora_weight` drops it: the base weight stays bitwise what it was.
`convert_lora_to_linear_layer` replaces every LoRA layer by a plain `nn.Linear` holding the merged
weight (DeepSpeed-Chat leaves fused LoRA layers in place and its saving code drops the `lora_` keys;
the state dict here is the same: merged `weight`, `bias`, no LoRA keys). At ZeRO-3 it gathers each
layer's parameters to merge them; the new layers hold whole (unpartitioned) weights, for saving.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..zero import GatheredParameters

LORA_NAMES = ("lora_right_weight", "lora_left_weight")


class LinearLayer_LoRA(nn.Module):  # noqa: N801 - DeepSpeed-Chat's name
    """A linear layer with a frozen weight and a trainable low-rank update (see the module docstring)."""

    def __init__(self, weight: nn.Parameter, lora_dim: int = 0, lora_scaling: float = 1, lora_droppout: float = 0,
                 bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if lora_dim <= 0:
            raise ValueError(f"LoRA needs lora_dim >= 1 (got {lora_dim}); pass --lora_dim > 0 or leave LoRA off")
        self.weight = weight
        self.bias = bias
        rows, columns = getattr(weight, "ds_shape", weight.shape)  # a ZeRO-3 partition knows its whole shape
        self.lora_right_weight = nn.Parameter(torch.zeros(columns, lora_dim, dtype=weight.dtype, device=weight.device))
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, rows, dtype=weight.dtype, device=weight.device))
        self.lora_scaling = lora_scaling / lora_dim
        self.lora_dropout: nn.Module = nn.Dropout(lora_droppout) if lora_droppout > 0 else nn.Identity()
        self.reset_parameters()
        self.weight.requires_grad = False
        self.fuse_lora = False
        self._fused: Tensor | None = None

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_right_weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_left_weight)

    def merged_weight(self) -> Tensor:
        """W + scaling * L^T R^T as a new tensor (the weights must be whole: gathered at ZeRO-3)."""
        delta = torch.matmul(self.lora_left_weight.t(), self.lora_right_weight.t())
        return self.weight.detach() + self.lora_scaling * delta.detach()

    def fuse_lora_weight(self) -> None:
        """Forward with the merged weight, computed now from whole weights, until `unfuse_lora_weight` (the
        trained weight is not touched; a step taken while fused is not seen by the merged copy)."""
        if not self.fuse_lora:
            self._fused = self.merged_weight()
        self.fuse_lora = True

    def unfuse_lora_weight(self) -> None:
        """Back to the separate low-rank path; drops the merged copy."""
        self._fused = None
        self.fuse_lora = False

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's argument name
        if self.fuse_lora and self._fused is not None:
            return F.linear(input, self._fused, self.bias)
        low_rank = self.lora_dropout(input) @ self.lora_right_weight @ self.lora_left_weight
        return F.linear(input, self.weight, self.bias) + low_rank * self.lora_scaling


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def convert_linear_layer_to_lora(model: nn.Module, part_module_name: str, lora_dim: int = 0, lora_scaling: float = 1,
                                 lora_droppout: float = 0) -> nn.Module:
    """Replace every `nn.Linear` whose qualified name contains `part_module_name` by a `LinearLayer_LoRA` (in place)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and part_module_name in n]
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear.weight, nn.Parameter)
        _set_submodule(model, name, LinearLayer_LoRA(linear.weight, lora_dim, lora_scaling, lora_droppout,
                                                     linear.bias))  # type: ignore[arg-type]
    return model


def convert_lora_to_linear_layer(model: nn.Module) -> nn.Module:
    """Replace every `LinearLayer_LoRA` by an `nn.Linear` with the merged weight (in place; see the module docstring)."""
    names = [n for n, m in model.named_modules() if isinstance(m, LinearLayer_LoRA)]
    for name in names:
        lora = model.get_submodule(name)
        assert isinstance(lora, LinearLayer_LoRA)
        params = [lora.weight, lora.lora_left_weight, lora.lora_right_weight] + ([lora.bias] if lora.bias is not None else [])
        with GatheredParameters(params), torch.no_grad():
            merged = lora.merged_weight()
            linear = nn.Linear(merged.shape[1], merged.shape[0], bias=lora.bias is not None, device=merged.device,
                               dtype=merged.dtype)
            linear.weight.copy_(merged)
            if lora.bias is not None:
                linear.bias.copy_(lora.bias)
        linear.weight.requires_grad_(lora.weight.requires_grad)
        _set_submodule(model, name, linear)
    return model


def only_optimize_lora_parameters(model: nn.Module, force_optimize_params: Iterable[str] = ()) -> nn.Module:
    """requires_grad only for the LoRA weights (and the parameters named in `force_optimize_params`, e.g. `v_head.weight`)."""
    forced = set(force_optimize_params)
    for name, param in model.named_parameters():
        param.requires_grad = any(k in name for k in LORA_NAMES) or name in forced
    return model


def make_model_gradient_checkpointing_compatible(model: nn.Module) -> nn.Module:
    """Make the input embeddings' output require grad, so checkpointed blocks get gradients when only LoRA trains."""
    enable = getattr(model, "enable_input_require_grads", None)
    if callable(enable):
        enable()
    elif callable(getattr(model, "get_input_embeddings", None)):
        def make_inputs_require_grad(module: nn.Module, inputs: Any, output: Tensor) -> None:
            output.requires_grad_(True)

        model.get_input_embeddings().register_forward_hook(make_inputs_require_grad)  # type: ignore[operator]
    return model


__all__ = ["LinearLayer_LoRA", "convert_linear_layer_to_lora", "convert_lora_to_linear_layer",
           "make_model_gradient_checkpointing_compatible", "only_optimize_lora_parameters"]
