"""The autograd pieces stage 3 puts around modules: re-gathering before a module's backward, and a
linear layer that does not pin gathered weights between forward and backward."""
from __future__ import annotations

import types
import weakref
from typing import Any, Protocol

import torch


class BackwardListener(Protocol):
    def pre_backward(self, module: torch.nn.Module) -> None:
        """`module`'s backward is about to run: gather what it needs."""


class ModuleListener(BackwardListener, Protocol):
    module: torch.nn.Module
    module_units: dict[torch.nn.Module, list[Any]]

    def pre_forward(self, module: torch.nn.Module) -> None:
        """`module` is about to run."""

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        """`module` has run; returns its (possibly wrapped) output."""


def attach_hooks(listener: ModuleListener, memory_efficient_linear: bool) -> tuple[list[Any], list[torch.nn.Module]]:
    """Forward hooks on every module of `listener.module` that call the listener through a weak
    reference (the model must not keep it alive), and memory-efficient forwards on the plain
    nn.Linear layers that have partitioned parameters. Returns (hook handles, patched linears)."""
    ref = weakref.ref(listener)

    # Under torch.compile the hooks run eagerly, between compiled graphs: dynamo cannot trace their
    # bookkeeping (and must not: gathering is a side effect), so it breaks the graph around them.
    @torch._dynamo.disable
    def pre(module: torch.nn.Module, args: Any) -> None:
        found = ref()
        if found is not None:
            found.pre_forward(module)

    @torch._dynamo.disable
    def post(module: torch.nn.Module, args: Any, output: Any) -> Any:
        found = ref()
        return found.post_forward(module, output) if found is not None else None

    handles, patched = [], []
    for mod in listener.module.modules():
        handles.append(mod.register_forward_pre_hook(pre))
        handles.append(mod.register_forward_hook(post, always_call=True))  # pops the stack even when forward raises
        if memory_efficient_linear and type(mod).forward is torch.nn.Linear.forward and listener.module_units.get(mod):
            mod.forward = types.MethodType(memory_efficient_linear_forward, mod)
            patched.append(mod)
    return handles, patched


def detach_hooks(handles: list[Any], patched: list[torch.nn.Module]) -> None:
    """Undo `attach_hooks` (idempotent)."""
    for handle in handles:
        handle.remove()
    handles.clear()
    for mod in patched:
        mod.__dict__.pop("forward", None)  # back to the class's forward
    patched.clear()


class _PreBackward(torch.autograd.Function):
    """Identity on a module's outputs in forward; in backward, first tells the manager the module's backward is next."""

    @staticmethod
    def forward(ctx: Any, listener: BackwardListener, module: torch.nn.Module, *tensors: torch.Tensor) -> Any:
        ctx.listener, ctx.module = listener, module
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        ctx.listener.pre_backward(ctx.module)
        return (None, None, *grads)


class _LinearSavingParameter(torch.autograd.Function):
    """F.linear that saves the weight Parameter for backward rather than the `weight.t()` view F.linear saves.

    The view would pin the gathered buffer from forward until backward, so every linear layer's
    weights would stay resident in between. The Parameter itself is re-gathered before its module's
    backward (`_PreBackward`), so saving it costs nothing (DeepSpeed's `memory_efficient_linear`).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        grad_x = grad.matmul(weight) if ctx.needs_input_grad[0] else None
        grad_w = rows.t().matmul(x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        grad_b = rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def memory_efficient_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _LinearSavingParameter.apply(x, module.weight, module.bias)


def wrap_outputs(output: Any, listener: BackwardListener, module: torch.nn.Module) -> Any:
    """`output` with every tensor that requires grad passed through one _PreBackward."""
    found: list[torch.Tensor] = []
    _collect(output, found)
    if not found:
        return output
    wrapped = iter(_PreBackward.apply(listener, module, *found))
    return _replace(output, wrapped)


def _collect(obj: Any, found: list[torch.Tensor]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad:
            found.append(obj)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect(item, found)
    elif isinstance(obj, dict):
        for item in obj.values():
            _collect(item, found)


def _replace(obj: Any, wrapped: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return next(wrapped) if obj.requires_grad else obj
    if isinstance(obj, tuple):
        items = [_replace(item, wrapped) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_replace(item, wrapped) for item in obj]
    if isinstance(obj, dict):
        for key in list(obj.keys()):
            obj[key] = _replace(obj[key], wrapped)  # in place: keeps ModelOutput and friends intact
        return obj
    return obj
