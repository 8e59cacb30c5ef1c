"""The strategy of an engine without an optimizer at stages 0-2: the whole module on every rank, nothing to step."""
from __future__ import annotations

from typing import Any

import torch

from ..comm.topology import AxisGroup
from .base import StepResult, tensor_bytes


class ModuleOnly:
    """Inference (or a frozen reference model) at stages 0-2: weights as they are, no gradients, no state.

    The engine refuses backward() and step() without an optimizer before they reach here.
    """

    replicated = True
    partitions_parameters = False
    optimizer = None

    def __init__(self, module: torch.nn.Module, data: AxisGroup) -> None:
        self.module = module
        self.data = data

    def prepare_backward(self, boundary: bool) -> None:
        raise RuntimeError("this engine has no optimizer: there is no backward to prepare")

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        raise RuntimeError("this engine has no optimizer: call loss.backward() yourself, or pass an optimizer")

    def step(self, max_norm: float) -> StepResult:
        raise RuntimeError("this engine has no optimizer: there is nothing to step")

    def zero_grad(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def sync_masters_from_model(self) -> None:
        pass

    def load_universal(self, universal: dict[str, Any]) -> None:
        pass

    def memory_breakdown(self) -> dict[str, int]:
        return {"parameters": tensor_bytes(list(self.module.parameters()))}

    def module_state_dict(self, exclude_frozen: bool = False) -> dict[str, torch.Tensor]:
        return drop_frozen(self.module, self.module.state_dict(), exclude_frozen)

    def load_module_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        self.module.load_state_dict(state, strict=strict)

    def close(self) -> None:
        pass


def drop_frozen(module: torch.nn.Module, state: dict[str, torch.Tensor], exclude: bool) -> dict[str, torch.Tensor]:
    """`state` without the entries of parameters that do not require grad, when `exclude`."""
    if not exclude:
        return state
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    return {k: v for k, v in state.items() if k not in frozen}
