"""What a forward pass costs, op by op, and which module it is charged to.

Counting happens below Python, on the aten ops a forward pass runs (a `TorchDispatchMode`), so an op is
seen however it was written (`F.linear`, `x @ w`, `torch.einsum`, a custom module's `torch.addmm`).
The conventions, and where they differ from DeepSpeed 0.19.8's profiler (which patches a list of
Python functions), are listed in docs/observability.md. In short:

- matrix products (mm, addmm, bmm, baddbmm, linear, matmul, einsum, convolutions): torch.utils.flop_counter's
  formulas, 2 FLOPs per multiply-accumulate; bias additions are not counted (DeepSpeed counts them in
  `torch.addmm`, once per call instead of once per row, and in convolutions, but not in `F.linear`);
- attention (`F.scaled_dot_product_attention`, any backend): its two matrix products over the full
  query x key square, causal or not (as DeepSpeed and torch count it), whichever kernel runs; nothing
  inside it is counted again (the math fallback's softmax and scaling);
- LayerNorm / GroupNorm / InstanceNorm: DeepSpeed's 5 FLOPs per element with an affine transform, 4 without;
  BatchNorm: the same while training, 2 (1) in eval;
- RMSNorm (`F.rms_norm`, `nn.RMSNorm`, and any module whose class name ends in "RMSNorm", such as
  Hugging Face's LlamaRMSNorm): 4 FLOPs per element with a weight (square, mean, scale, weight), 3
  without; DeepSpeed counts 0;
- softmax and the activations DeepSpeed counts (relu, relu6, prelu, elu, leaky_relu, silu, gelu): 1 FLOP
  per element, however they are called; activations written as arithmetic (GPT-2's `gelu_new`) count 0;
- pooling: 1 FLOP per input element; upsampling: 1 per output element (DeepSpeed's);
- embeddings, dropout, elementwise arithmetic, reductions, copies: 0.

MACs are half the FLOPs of matrix products and attention, and 0 for everything else (DeepSpeed's).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from ...accelerator import get_accelerator

aten = torch.ops.aten
Cost = tuple[int, int]  # (FLOPs, MACs)


def _numel(x: Any) -> int:
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _matmul_rule(formula: Callable[..., int]) -> Callable[..., Cost]:
    def rule(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Cost:
        flops = int(formula(*args, **kwargs, out_val=out))
        return flops, flops // 2
    return rule


def _sdpa_cost(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Cost:
    flops = int(flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape))
    return flops, flops // 2


def _per_element(factor_with_weight: int, factor_without: int, weight_at: int) -> Callable[..., Cost]:
    """`factor` FLOPs per input element, the larger one when the op's argument `weight_at` is a tensor."""
    def rule(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Cost:
        weighted = len(args) > weight_at and isinstance(args[weight_at], torch.Tensor)
        return _numel(args[0]) * (factor_with_weight if weighted else factor_without), 0
    return rule


def _batch_norm(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Cost:
    if func._overloadpacket is aten._native_batch_norm_legit_no_training:
        training = False
    else:  # the `no_stats` overload has no running statistics before `training`
        training = bool(args[3] if func._overloadname == "no_stats" else args[5])
    affine = isinstance(args[1], torch.Tensor)
    per_element = (5 if affine else 4) if training else (2 if affine else 1)
    return _numel(args[0]) * per_element, 0


def _input_elements(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Cost:
    return _numel(args[0]), 0


def _output_elements(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Cost:
    return _numel(out[0] if isinstance(out, (tuple, list)) else out), 0


def _rules() -> dict[Any, Callable[..., Cost]]:
    """aten op packet -> its cost rule."""
    rules: dict[Any, Callable[..., Cost]] = {op: _matmul_rule(f) for op, f in flop_counter.flop_registry.items()
                                             if isinstance(op, torch._ops.OpOverloadPacket)}
    # torch's registry has no formula for the CPU flash-attention kernel; its cost is the same.
    rules[aten._scaled_dot_product_flash_attention_for_cpu] = lambda func, args, kwargs, out: _sdpa_cost(*args[:3])
    norm = _per_element(5, 4, weight_at=2)  # native_layer_norm(input, shape, weight, bias, eps)
    rules[aten.native_layer_norm] = norm
    rules[aten.native_group_norm] = _per_element(5, 4, weight_at=1)  # (input, weight, bias, N, C, HxW, group, eps)
    for op in (aten.native_batch_norm, aten._native_batch_norm_legit, aten._native_batch_norm_legit_no_training):
        rules[op] = _batch_norm
    for op in (aten._softmax, aten._safe_softmax, aten.relu, aten.relu_, aten.gelu, aten.gelu_, aten.silu, aten.silu_,
               aten.elu, aten.elu_, aten.leaky_relu, aten.leaky_relu_, aten.hardtanh, aten.hardtanh_, aten._prelu_kernel,
               aten.avg_pool2d, aten.avg_pool3d, aten.max_pool1d, aten.max_pool2d_with_indices, aten.max_pool3d_with_indices,
               aten.mkldnn_max_pool2d, aten._adaptive_avg_pool2d, aten._adaptive_avg_pool3d, aten.adaptive_max_pool2d,
               aten.adaptive_max_pool3d):
        rules[op] = _input_elements
    for op in (aten.upsample_nearest1d, aten.upsample_nearest2d, aten.upsample_nearest3d, aten.upsample_linear1d,
               aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten.upsample_trilinear3d, aten._upsample_nearest_exact1d,
               aten._upsample_nearest_exact2d, aten._upsample_nearest_exact3d):
        rules[op] = _output_elements
    return rules


RULES = _rules()


def _rms_norm_cost(x: torch.Tensor, has_weight: bool) -> Cost:
    return _numel(x) * (4 if has_weight else 3), 0


@dataclass
class ModuleStats:
    """One module's forward passes while profiling: what ran directly in it, and its measured time."""

    params: int
    flops: int = 0  # own: ops run by the module itself, not by its submodules
    macs: int = 0
    duration: float = 0.0  # seconds, summed over its calls (submodules included)
    calls: int = 0
    ignored: bool = False
    starts: list[float] = field(default_factory=list)


def param_count(module: torch.nn.Module) -> int:
    """The module's parameters (shared ones once); a ZeRO-3 partitioned parameter counts whole."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())


def is_rms_norm(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


class CostCounter:
    """Charges each counted op to the innermost module running (the top of `stack`)."""

    def __init__(self) -> None:
        self.stats: dict[torch.nn.Module, ModuleStats] = {}
        self.stack: list[ModuleStats] = []
        self.suppressed = 0  # inside an op or module counted as a whole (attention, RMSNorm, ignored modules)

    def add(self, cost: Cost) -> None:
        if self.stack and not self.suppressed:
            self.stack[-1].flops += cost[0]
            self.stack[-1].macs += cost[1]

    @property
    def counting(self) -> bool:
        return bool(self.stack) and not self.suppressed


class _Counts:
    def __init__(self, counter: CostCounter) -> None:
        super().__init__()
        self.counter = counter


class _DispatchCounting(_Counts, TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = RULES.get(func._overloadpacket) if self.counter.counting else None
        if rule is not None:
            self.counter.add(rule(func, args, kwargs, out))
        return out


class _FunctionCounting(_Counts, TorchFunctionMode):
    """Counts attention and F.rms_norm as wholes, whatever kernel or decomposition runs inside."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            cost = _sdpa_cost(*_arguments(args, kwargs, ("query", "key", "value")))
        elif func is F.rms_norm:
            x, weight = _arguments(args, kwargs, ("input", "normalized_shape", "weight"))[0::2]
            cost = _rms_norm_cost(x, weight is not None)
        else:
            return func(*args, **kwargs)
        self.counter.add(cost)
        self.counter.suppressed += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.counter.suppressed -= 1


def _arguments(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...]) -> list[Any]:
    return [args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names)]


class ForwardCounting:
    """Module hooks plus the two counting modes: `start()` ... forward passes ... `stop()`."""

    def __init__(self, model: torch.nn.Module, ignore: tuple[type, ...] = ()) -> None:
        self.model = model
        self.ignore = ignore
        self.counter = CostCounter()
        self._handles: list[RemovableHandle] = []
        self._modes: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.counter.stats = {m: ModuleStats(param_count(m)) for m in self.model.modules()}
        for m in self.model.modules():
            if isinstance(m, self.ignore):
                for inner in m.modules():
                    self.counter.stats[inner].ignored = True

    @property
    def active(self) -> bool:
        return bool(self._modes)

    def start(self) -> None:
        if self.active:
            return
        for module in self.model.modules():
            stats = self.counter.stats[module]
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(module, stats), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post_hook(module, stats), always_call=True))
        self._modes = [_FunctionCounting(self.counter), _DispatchCounting(self.counter)]
        for mode in self._modes:
            mode.__enter__()

    def stop(self) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(None, None, None)
        self._modes = []
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, module: torch.nn.Module, stats: ModuleStats) -> Callable[..., None]:
        rms_norm = is_rms_norm(module)
        whole = stats.ignored or rms_norm  # nothing inside is counted on its own

        def hook(mod: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.counter.stack.append(stats)
            if rms_norm:
                x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                self.counter.add(_rms_norm_cost(x, getattr(module, "weight", None) is not None) if x is not None else (0, 0))
            if whole:
                self.counter.suppressed += 1
            stats.starts.append(_clock())
        return hook

    def _post_hook(self, module: torch.nn.Module, stats: ModuleStats) -> Callable[..., None]:
        whole = stats.ignored or is_rms_norm(module)

        def hook(mod: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not stats.starts:
                return  # profiling started inside this module's forward
            stats.duration += _clock() - stats.starts.pop()
            stats.calls += 1
            if whole:
                self.counter.suppressed -= 1
            self.counter.stack.pop()
        return hook


def _clock() -> float:
    get_accelerator().synchronize()
    return time.perf_counter()

