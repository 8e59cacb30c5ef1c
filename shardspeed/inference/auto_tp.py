"""Tensor-parallel inference: shard a Hugging Face causal LM's layers over a tensor group, no autograd.

Per decoder block, DeepSpeed's AutoTP rules:
- attention is split by whole key/value-head groups (a rank takes kv_heads // tp, the first
  kv_heads % tp ranks one more, so an uneven split works) and each rank keeps the query heads of its
  groups; the output projection keeps the matching input features and its partial sums are
  all-reduced (the bias added once, after);
- the MLP's gate/up (or GPT-2's c_fc) keep a slice of the intermediate features, the down
  projection the matching input slice, all-reduced after; Mixtral's fused experts are cut the same
  way inside every expert, with one all-reduce of the block's output, and its router stays whole;
- `lm_head` keeps a slice of its input features and is all-reduced, so every rank gets the full
  logits; embeddings and norms stay replicated.

Llama, Qwen2, Qwen3, Mistral, Mixtral and GPT-2 are known (DeepSpeed refuses GPT-2). Other models
name their row-parallel linears with an `injection_policy` `{LayerClass: ("self_attn.o_proj",
"mlp.down_proj")}`: every other Linear inside those layers is split by output features.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm.topology import AxisGroup
from ..config.errors import ConfigError
from ..tensor_parallel.layers import split_range

LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "mixtral")
SUPPORTED = (*LLAMA_LIKE, "gpt2")


class GroupAllReduce:
    """The default reduction of a row-parallel module: `dist.all_reduce` over the tensor group, in place.
    Every module doing one keeps it as `tp_reduce`, which `use_reduction` replaces (e.g. by a
    shared-memory all-reduce on a CPU host)."""

    def __init__(self, tp: AxisGroup) -> None:
        self.group = tp.group

    def __call__(self, x: Tensor) -> Tensor:
        dist.all_reduce(x, group=self.group)
        return x


def use_reduction(model: nn.Module, reduce: Callable[[Tensor], Tensor]) -> None:
    """Make every row-parallel module of a sharded `model` sum its partial results with `reduce`."""
    for module in model.modules():
        if "tp_reduce" in vars(module):
            setattr(module, "tp_reduce", reduce)


class RowParallelLinear(nn.Linear):
    """A Linear holding some input features of the whole layer: partial product, all-reduce, then the
    whole bias. `tp_row_split` tells the fast decode path that a reduction follows; `reduces_output`, that
    this module's own forward does it (the LM head's, which the fast path calls as it is)."""

    tp_row_split = True
    reduces_output = True

    def __init__(self, weight: Tensor, bias: Tensor | None, tp: AxisGroup, input_slice: tuple[int, int] | None = None) -> None:
        """`input_slice`: the input arrives whole (the LM head reads the replicated hidden states) and this
        rank uses features [start, end) of it; otherwise it arrives already sliced (after a column layer)."""
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.tp = tp
        self.tp_reduce: Callable[[Tensor], Tensor] = GroupAllReduce(tp)
        self.input_slice = input_slice

    def forward(self, x: Tensor) -> Tensor:
        if self.input_slice is not None:
            x = x[..., self.input_slice[0]:self.input_slice[1]]
        out = self.tp_reduce(nn.functional.linear(x, self.weight))
        return out + self.bias if self.bias is not None else out


class RowParallelConv1D(nn.Module):
    """GPT-2's Conv1D (weight [in, out]) holding some input rows: partial product, all-reduce, bias."""

    tp_row_split = True
    conv1d_layout = True  # weight stored [in, out], as transformers' Conv1D

    def __init__(self, weight: Tensor, bias: Tensor, tp: AxisGroup) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.nf = weight.shape[1]
        self.tp = tp
        self.tp_reduce: Callable[[Tensor], Tensor] = GroupAllReduce(tp)

    def forward(self, x: Tensor) -> Tensor:
        out = self.tp_reduce(torch.matmul(x, self.weight))
        return out + self.bias


def _column(linear: Any, rows: list[tuple[int, int]]) -> nn.Linear:
    """A Linear keeping output features `rows` (ranges, concatenated)."""
    weight = torch.cat([linear.weight.detach()[a:b] for a, b in rows])
    bias = torch.cat([linear.bias.detach()[a:b] for a, b in rows]) if linear.bias is not None else None
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _row(linear: Any, cols: tuple[int, int], tp: AxisGroup, whole_input: bool = False) -> RowParallelLinear:
    a, b = cols
    return RowParallelLinear(linear.weight.detach()[:, a:b], linear.bias.detach() if linear.bias is not None else None, tp,
                             input_slice=cols if whole_input else None)


def kv_head_range(kv_heads: int, tp: AxisGroup) -> tuple[int, int]:
    """This rank's key/value heads [start, end): DeepSpeed's uneven split (earlier ranks take the extra)."""
    return split_range(kv_heads, tp.size, tp.rank)


def _attention(attn: Any, heads: int, kv_heads: int, head_dim: int, tp: AxisGroup) -> None:
    group = heads // kv_heads
    k0, k1 = kv_head_range(kv_heads, tp)
    q_rows = [(k0 * group * head_dim, k1 * group * head_dim)]
    kv_rows = [(k0 * head_dim, k1 * head_dim)]
    attn.q_proj = _column(attn.q_proj, q_rows)
    attn.k_proj = _column(attn.k_proj, kv_rows)
    attn.v_proj = _column(attn.v_proj, kv_rows)
    attn.o_proj = _row(attn.o_proj, q_rows[0], tp)


def _mlp(mlp: Any, tp: AxisGroup) -> None:
    cols = split_range(mlp.gate_proj.out_features, tp.size, tp.rank)
    mlp.gate_proj = _column(mlp.gate_proj, [cols])
    mlp.up_proj = _column(mlp.up_proj, [cols])
    mlp.down_proj = _row(mlp.down_proj, cols, tp)


def _fused_experts(experts: Any, tp: AxisGroup) -> None:
    """transformers 5's fused experts (gate_up_proj [E, 2I, H], down_proj [E, H, I]): each expert keeps a
    slice of I; the block's output (a sum over experts of down projections) is all-reduced once."""
    gate_up, down = getattr(experts, "gate_up_proj"), getattr(experts, "down_proj")
    inner = down.shape[2]
    a, b = split_range(inner, tp.size, tp.rank)
    with torch.no_grad():
        experts.gate_up_proj = nn.Parameter(torch.cat([gate_up[:, a:b], gate_up[:, inner + a:inner + b]], dim=1).clone(),
                                            requires_grad=False)
        experts.down_proj = nn.Parameter(down[:, :, a:b].clone(), requires_grad=False)
    experts.tp_reduce = GroupAllReduce(tp)
    experts.register_forward_hook(lambda m, _i, out: m.tp_reduce(out))


def _llama_like(model: Any, config: Any, tp: AxisGroup) -> None:
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if kv_heads < tp.size:
        raise ConfigError(f"`tensor_parallel.tp_size` {tp.size} is larger than the model's {kv_heads} key/value heads; "
                          "every rank needs at least one: choose a tp_size of at most that")
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    if not layers:
        raise ConfigError(f"AutoTP found no decoder layers (self_attn + mlp) in {type(model).__name__}")
    for layer in layers:
        _attention(layer.self_attn, heads, kv_heads, head_dim, tp)
        mlp = layer.mlp
        if hasattr(mlp, "gate_proj"):
            _mlp(mlp, tp)
        elif hasattr(getattr(mlp, "experts", None), "gate_up_proj"):
            _fused_experts(mlp.experts, tp)  # the router (mlp.gate) stays replicated
        else:
            raise ConfigError(f"AutoTP does not know the MLP {type(mlp).__name__} of {type(model).__name__}; name its "
                              "row-parallel linears with an injection_policy")


def _gpt2(model: Any, config: Any, tp: AxisGroup) -> None:
    heads = config.n_head
    if heads < tp.size:
        raise ConfigError(f"`tensor_parallel.tp_size` {tp.size} is larger than the model's {heads} attention heads")
    if getattr(config, "add_cross_attention", False):
        raise ConfigError("tensor-parallel inference does not shard GPT-2's cross-attention (config.add_cross_attention)")
    embed = config.n_embd
    head_dim = embed // heads
    h0, h1 = split_range(heads, tp.size, tp.rank)
    a, b = h0 * head_dim, h1 * head_dim
    for block in (m for m in model.modules() if type(m).__name__ == "GPT2Block"):
        attn, mlp = block.attn, block.mlp
        w, bias = attn.c_attn.weight.detach(), attn.c_attn.bias.detach()  # Conv1D: [in, 3E]
        cols = [slice(part * embed + a, part * embed + b) for part in range(3)]
        attn.c_attn.weight = nn.Parameter(torch.cat([w[:, c] for c in cols], dim=1).clone(), requires_grad=False)
        attn.c_attn.bias = nn.Parameter(torch.cat([bias[c] for c in cols]).clone(), requires_grad=False)
        attn.c_attn.nf = 3 * (b - a)
        attn.c_proj = RowParallelConv1D(attn.c_proj.weight.detach()[a:b], attn.c_proj.bias.detach(), tp)
        attn.num_heads = h1 - h0
        attn.split_size = b - a
        attn.embed_dim = b - a
        inner = mlp.c_fc.weight.shape[1]
        i0, i1 = split_range(inner, tp.size, tp.rank)
        mlp.c_fc.weight = nn.Parameter(mlp.c_fc.weight.detach()[:, i0:i1].clone(), requires_grad=False)
        mlp.c_fc.bias = nn.Parameter(mlp.c_fc.bias.detach()[i0:i1].clone(), requires_grad=False)
        mlp.c_fc.nf = i1 - i0
        mlp.c_proj = RowParallelConv1D(mlp.c_proj.weight.detach()[i0:i1], mlp.c_proj.bias.detach(), tp)


def _policy(model: Any, policy: dict[Any, Any], tp: AxisGroup) -> None:
    """`{LayerClass or name: (row-parallel linear names, ...)}`: those keep input slices (all-reduced after),
    every other Linear inside the layer keeps output slices; attention projections split by heads."""
    config = getattr(model, "config", None)
    for layer_class, names in policy.items():
        names = (names,) if isinstance(names, str) else tuple(names)
        layers = [m for m in model.modules() if type(m) is layer_class or type(m).__name__ == layer_class]
        if not layers:
            raise ConfigError(f"injection_policy: the model has no layer of class {getattr(layer_class, '__name__', layer_class)}")
        for layer in layers:
            linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
            for name in names:
                if not any(n == name or n.endswith("." + name) for n in linears):
                    raise ValueError(f"Injection policy layer'{name}' not valid.")
            attn = getattr(layer, "self_attn", None)
            if attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")) and config is not None:
                heads = config.num_attention_heads
                kv_heads = getattr(config, "num_key_value_heads", None) or heads
                head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
                _attention(attn, heads, kv_heads, head_dim, tp)
                done = {f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            else:
                done = set()
            for name, linear in linears.items():
                if name in done:
                    continue
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                if any(name == n or name.endswith("." + n) for n in names):
                    cols = split_range(linear.in_features, tp.size, tp.rank)
                    setattr(parent, child, _row(linear, cols, tp))
                else:
                    setattr(parent, child, _column(linear, [split_range(linear.out_features, tp.size, tp.rank)]))


def _lm_head(model: Any, tp: AxisGroup) -> None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        return
    # A tied head shares the embedding's weight: the slice is a copy, so the embedding stays whole.
    model.set_output_embeddings(_row(head, split_range(head.in_features, tp.size, tp.rank), tp, whole_input=True))
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False  # the head is no longer the embedding


_PLANS: dict[str, Callable[[Any, Any, AxisGroup], None]] = {**{t: _llama_like for t in LLAMA_LIKE}, "gpt2": _gpt2}


def shard_for_inference(model: Any, tp: AxisGroup, injection_policy: dict[Any, Any] | None = None) -> Any:
    """Shard `model` in place over `tp` (its weights must be the same on every rank of `tp`)."""
    if tp.size == 1:
        return model
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    with torch.no_grad():
        if injection_policy:
            _policy(model, injection_policy, tp)
        elif model_type in _PLANS:
            _PLANS[model_type](model, config, tp)
        else:
            raise ConfigError(f"tensor-parallel inference knows Hugging Face model types {', '.join(SUPPORTED)}; "
                              f"{type(model).__name__} has model_type {model_type!r}: pass injection_policy="
                              "{LayerClass: (\"self_attn.o_proj\", \"mlp.down_proj\")} naming its row-parallel linears")
        _lm_head(model, tp)
    return model


__all__ = ["GroupAllReduce", "RowParallelConv1D", "RowParallelLinear", "SUPPORTED", "kv_head_range", "shard_for_inference",
           "use_reduction"]
