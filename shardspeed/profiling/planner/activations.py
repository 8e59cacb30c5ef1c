"""Activation memory of one micro batch, measured by running forward and backward on the meta device.

Every tensor an operator returns is counted from its creation until its storage is freed (meta
tensors carry sizes, not memory); the peak over forward and backward is the activation peak. It
counts what the model's own code keeps: tensors autograd saves, the loss's upcast logits, the
gradients flowing back, the recompute of a checkpointed layer. Parameters and buffers are not
counted (they are model states), and neither are parameter gradients beyond the moment they are
produced (ZeRO moves them into its buffers at once, see `states`).

Data-dependent branches (`tensor.item()`, `if mask.all():`) read 1 / True on the meta device: the
branch of an unpadded batch of full-length sequences, which is what the trace feeds. Attention through
`F.scaled_dot_product_attention` is counted as the fused kernels that run it in training keep it (flash
and memory-efficient attention on GPUs, the CPU's flash kernel): inputs, output and a row-wise
logsumexp, not the score matrix that the meta device's reference implementation would build.

When the forward cannot run on the meta device, a Hugging Face decoder falls back to Korthikanti
et al.'s count (2022, "Reducing Activation Recomputation in Large Transformer Models"):
s·b·h·(34 + 5·a·s/h) bytes per layer in 16-bit (2·s·b·h with checkpointing, plus one layer
recomputed), and 3 fp32 copies of the logits.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .model import PlannerError

Inputs = Callable[[int, int], tuple[tuple[Any, ...], dict[str, Any]]]
"""(micro_batch, seq_len) -> (args, kwargs) of the module's forward, as meta tensors."""


@dataclass(frozen=True)
class ActivationEstimate:
    peak: int  # bytes alive at once over forward and backward, beyond the model states
    method: str  # "meta trace" or the fallback's name
    small_peak: int = 0  # of which in blocks under the heap limit (`Hardware.mmap_threshold`), at their own peak


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of distinct storages the operators create, while any tensor on them lives."""

    def __init__(self, excluded: set[int], small_block: int) -> None:
        super().__init__()
        self.excluded = excluded
        self.small_block = small_block
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0
        self.small_live = 0
        self.small_peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage()._cdata
        if key in self.excluded:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = tensor.untyped_storage().nbytes()
            self.live += self.sizes[key]
            self.peak = max(self.peak, self.live)
            if self.sizes[key] < self.small_block:
                self.small_live += self.sizes[key]
                self.small_peak = max(self.small_peak, self.small_live)
        self.refs[key] += 1
        # Freed when the tensor is: torch keeps a tensor's Python object alive as long as the tensor.
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            size = self.sizes.pop(key)
            self.live -= size
            if size < self.small_block:
                self.small_live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return _unit_scalar(args[0].dtype)
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


def _unit_scalar(dtype: torch.dtype) -> bool | int | float:
    if dtype == torch.bool:
        return True
    return 1.0 if dtype.is_floating_point else 1


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel: forward keeps q, k, v, the output and a logsumexp per row;
    backward gives gradients shaped like q, k and v (meta tensors: shapes only)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value)


@contextmanager
def _attention_as_fused() -> Iterator[None]:
    """`F.scaled_dot_product_attention` replaced by `_FusedAttention` while tracing (this process, briefly)."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def can_checkpoint(module: torch.nn.Module) -> bool:
    """Whether the planner can switch activation checkpointing on and off (Hugging Face models)."""
    return bool(getattr(module, "supports_gradient_checkpointing", False))


def set_checkpointing(module: torch.nn.Module, on: bool) -> None:
    """Hugging Face checkpointing on (every layer, reentrant, no RNG state on the meta device) or off."""
    if on:
        kwargs = {"use_reentrant": True, "preserve_rng_state": False}
        enable = getattr(module, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=kwargs)
        else:
            getattr(module, "gradient_checkpointing_enable")(gradient_checkpointing_kwargs=kwargs)
    else:
        off = getattr(module, "activation_checkpointing_disable", None) or getattr(module, "gradient_checkpointing_disable")
        off()


def causal_lm_inputs(module: torch.nn.Module) -> Inputs | None:
    """Token ids as labels too, for a Hugging Face causal language model; None for other modules."""
    config = getattr(module, "config", None)
    if not isinstance(getattr(config, "vocab_size", None), int):
        return None

    def make(batch: int, seq: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
        return (), {"input_ids": ids, "labels": ids, "use_cache": False}

    return make


def trace_activations(module: torch.nn.Module, micro_batch: int, seq_len: int, dtype: torch.dtype,
                      checkpointing: bool, inputs: Inputs | None = None, small_block: int = 128 * 1024) -> ActivationEstimate:
    """The activation peak of one training micro step of `module` (a meta-device module this call may change),
    and the peak of its blocks smaller than `small_block` bytes."""
    inputs = inputs or causal_lm_inputs(module)
    if inputs is None:
        raise PlannerError(f"{type(module).__name__} is not a Hugging Face language model: pass inputs=(micro_batch, "
                           "seq_len) -> (args, kwargs) of meta tensors for its forward, or activation_bytes=")
    module.to(dtype).train()
    if can_checkpoint(module):
        set_checkpointing(module, checkpointing)
    excluded = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}
    handles = [p.register_post_accumulate_grad_hook(_drop_grad) for p in module.parameters() if p.requires_grad]
    mode = _LiveBytes(excluded, small_block)
    try:
        with _attention_as_fused(), mode:
            args, kwargs = inputs(micro_batch, seq_len)
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    mode.track(t)
            loss = _loss(module(*args, **kwargs))
            loss.backward()
            del loss, args, kwargs
    finally:
        for handle in handles:
            handle.remove()
    return ActivationEstimate(mode.peak, "meta trace", mode.small_peak)


def _drop_grad(param: torch.Tensor) -> None:
    param.grad = None  # ZeRO takes each gradient into its own buffers as soon as it is produced


def _loss(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    first = output if isinstance(output, torch.Tensor) else next(
        (t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad), None)
    if first is None:
        raise PlannerError("the module's forward returned no tensor that requires grad to take a backward from")
    return first if first.dim() == 0 else first.float().mean()


def decoder_formula(config: Any, micro_batch: int, seq_len: int, dtype: torch.dtype, checkpointing: bool) -> int:
    """Korthikanti et al.'s activation bytes of a decoder from its Hugging Face config (the fallback)."""
    def get(*names: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        raise PlannerError(f"the model's config has none of {names}: cannot estimate its activations")

    layers = get("num_hidden_layers", "n_layer")
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    scale = torch.empty(0, dtype=dtype).element_size() / 2
    sbh = seq_len * micro_batch * hidden
    layer = sbh * (34 + 5 * heads * seq_len / hidden) * scale
    kept = layers * 2 * sbh * scale + layer if checkpointing else layers * layer
    return int(kept + 3 * 4 * seq_len * micro_batch * vocab)
