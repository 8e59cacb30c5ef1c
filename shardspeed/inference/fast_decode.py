"""The fast decode path behind `replace_with_kernel_inject=True`: a compact re-implementation of a
Hugging Face causal LM that Hugging Face's own `generate` drives.

`build_fast_model(model, max_out_tokens)` returns a `FastCausalLM` for LlamaForCausalLM,
Qwen2ForCausalLM, MistralForCausalLM and GPT2LMHeadModel. Per decoder layer it holds:

- one fused QKV projection (Llama family: q, k and v concatenated, biases too; GPT-2's `c_attn`
  already is one), and for gated MLPs one fused gate-up projection;
- attention through `torch.nn.functional.scaled_dot_product_attention`, grouped-query heads folded
  into the query length so keys and values are never repeated;
- RoPE from cos/sin tables precomputed by the model's own rotary module for `max_out_tokens`
  positions (so every static RoPE variant HF computes is reproduced exactly);
- a `StaticKVCache` slot: [batch, kv_heads, max_out_tokens, head_dim], written in place.

Weights are shared, not copied: embeddings, norms, output projections and the LM head are the
source model's own modules, and the source's q/k/v (gate/up) weights are re-pointed at views of
the fused tensors, so building the fast model costs no extra weight memory. Build it after the
source model has its final dtype and device; casting or moving either model afterwards breaks that
sharing (the fast model keeps working on its own copy).

Generation: `FastCausalLM` is a `PreTrainedModel` + `GenerationMixin`, so `generate` runs HF's own
loops (greedy, sampling, beam search with `num_beams > 1`, left-padded batches, eos/pad, logits
processors). `generate` gets the model's cache (allocated once per batch size, dtype and device,
reset between calls; beam search reorders it in place). A prompt plus new tokens longer than
`max_out_tokens` is refused up front, naming both numbers.

Tensor parallelism: the source may already be sharded (inference AutoTP): q/k/v, gate/up hold this
rank's output slices (attention split by whole KV-head groups, possibly unevenly), o_proj/down_proj
this rank's input slices. Head counts come from the weight shapes, never from the config. After
each row-parallel projection (attention output, MLP down) the fast model applies
`reduce(x @ W_local^T)` and then adds the bias once (as `tensor_parallel.RowParallelLinear` does);
after the LM head it applies `reduce` only when `lm_head.tp_row_split` is true (that module does its
own input slicing). `reduce` defaults to an all-reduce over `tp.group` when `tp.size > 1`.

torch.compile: `FastCausalLM.compile_decode(...)` compiles the tensor-only core with static shapes:
attention runs over all `max_out_tokens` slots (masked), positions are tensors, the cache keeps its
addresses. One graph serves every decode step of a given batch size; prefill recompiles per new
prompt length (dynamo turns that dimension dynamic after the second one), and a new batch size
(a new cache) compiles again. Eager mode (the default) attends over the written slots only.
CUDA graphs (e.g. `mode="reduce-overhead"`) need exactly these static addresses; capturing is the
caller's business.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.pytorch_utils import Conv1D

from ..comm.topology import AxisGroup
from ..tensor_parallel.comm import reduce_from_tp
from .static_cache import StaticKVCache

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "GPT2LMHeadModel")
_LLAMA_FAMILY = SUPPORTED[:3]
# RoPE variants whose frequencies change with the sequence length at run time; a table cannot hold them.
_RUNTIME_ROPE = ("dynamic", "longrope")

Reduce = Callable[[torch.Tensor], torch.Tensor]


class _Proj(nn.Module):
    """y = x W^T + b, with W stored [out, in] (nn.Linear) or [in, out] (HF's Conv1D, `transposed`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool = False) -> None:
        super().__init__()
        self.weight, self.bias, self.transposed = weight, bias, transposed

    @classmethod
    def of(cls, module: nn.Module) -> _Proj:
        """Share `module`'s parameters (an nn.Linear or a Conv1D)."""
        if isinstance(module, nn.Linear):
            return cls(module.weight, module.bias)
        if isinstance(module, Conv1D) or getattr(module, "conv1d_layout", False):  # tensor-parallel Conv1D slices too
            return cls(getattr(module, "weight"), getattr(module, "bias"), transposed=True)
        raise TypeError(f"the fast decode path reads nn.Linear or Conv1D projections; got {type(module).__name__}")

    @classmethod
    def fused(cls, linears: Sequence[nn.Module]) -> _Proj:
        """One projection whose output is the concatenation of `linears`' outputs. The originals'
        weights (and biases) become views of the fused tensors, so no memory is duplicated."""
        parts = [cls.of(m) for m in linears]
        if any(p.transposed for p in parts):
            raise TypeError("fusing Conv1D projections is not supported")
        with torch.no_grad():
            weight = torch.cat([p.weight for p in parts])
            has_bias = any(p.bias is not None for p in parts)
            bias = torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.weight.shape[0])
                              for p in parts]) if has_bias else None
            start = 0
            for p in parts:
                stop = start + p.weight.shape[0]
                p.weight.data = weight[start:stop]
                if p.bias is not None and bias is not None:
                    p.bias.data = bias[start:stop]
                start = stop
        return cls(nn.Parameter(weight, requires_grad=False),
                   nn.Parameter(bias, requires_grad=False) if bias is not None else None)

    @property
    def out_features(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, bias)
        flat = x.reshape(-1, x.shape[-1])  # as HF's Conv1D computes it, for bit-equal results
        out = torch.addmm(bias, flat, self.weight) if bias is not None else flat @ self.weight
        return out.view(*x.shape[:-1], out.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def row_parallel(self, x: torch.Tensor, reduce: Reduce | None) -> torch.Tensor:
        """This rank's partial product, summed over the tensor-parallel group, plus the bias once."""
        if reduce is None:
            return self(x)
        y = reduce(self._matmul(x, None))
        return y if self.bias is None else y + self.bias


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [..., head_dim] (HF's `apply_rotary_pos_emb` with `rotate_half`, the same operations)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _attention_mask(key_valid: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """[batch, 1, new, keys] bool: the query at cache slot `positions[i]` sees key slot j when j is at or
    before it, is a real token (`key_valid`), and lies within the sliding `window` (HF: j > i - window).
    A query that sees nothing (a left-padding position) is let see every slot, so attention stays
    finite there; its output feeds only other padding positions, which nothing real attends to."""
    keys = torch.arange(key_valid.shape[1], device=key_valid.device)
    visible = keys <= positions[:, None]
    if window is not None:
        visible = visible & (keys > positions[:, None] - window)
    mask = visible[None, None] & key_valid[:, None, None, :]
    return mask | ~mask.any(dim=-1, keepdim=True)


class _Attention(nn.Module):
    """Fused-QKV self-attention over this rank's heads, reading and writing the static cache."""

    def __init__(self, qkv: _Proj, out: _Proj, head_dim: int, kv_heads: int, scale: float,
                 window: int | None, layer_idx: int, reduce: Reduce | None) -> None:
        super().__init__()
        heads = qkv.out_features // head_dim - 2 * kv_heads
        if heads <= 0 or heads % kv_heads or qkv.out_features % head_dim:
            raise ValueError(f"layer {layer_idx}: QKV output {qkv.out_features} does not hold a whole number of "
                             f"query heads per {kv_heads} key/value heads of size {head_dim}")
        self.qkv, self.out = qkv, out
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale, self.window, self.layer_idx, self.reduce = scale, window, layer_idx, reduce

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor,
                cache: StaticKVCache | None, positions: torch.Tensor, kv_len: int | None) -> torch.Tensor:
        batch, new = x.shape[:2]
        d, heads, kv, group = self.head_dim, self.heads, self.kv_heads, self.heads // self.kv_heads
        qkv = self.qkv(x)
        # Queries and keys sit side by side in the fused output: RoPE rotates them in one pass.
        qk = qkv[..., :(heads + kv) * d].view(batch, new, heads + kv, d)
        if rope is not None:
            qk = _rotate(qk, *rope)
        q, k = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:].transpose(1, 2)
        v = qkv[..., (heads + kv) * d:].view(batch, new, kv, d).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(self.layer_idx, k, v, positions, kv_len)
        # Grouped-query attention: the `group` query heads sharing one KV head become `group * new`
        # query rows of that head (row g*new + i is head g's query i), so K/V are read as stored.
        q = q.reshape(batch, kv, group * new, d)
        if group > 1 and new > 1:
            mask = mask.repeat(1, 1, group, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        out = out.view(batch, heads, new, d).transpose(1, 2).reshape(batch, new, heads * d)
        return self.out.row_parallel(out, self.reduce)


class _MLP(nn.Module):
    """down(act(gate(x)) * up(x)) with gate|up fused (`gated`), or down(act(up(x)))."""

    def __init__(self, up: _Proj, down: _Proj, act: nn.Module, gated: bool, reduce: Reduce | None) -> None:
        super().__init__()
        self.up, self.down, self.act, self.gated, self.reduce = up, down, act, gated, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.down.row_parallel(h, self.reduce)


class _Block(nn.Module):
    """A pre-norm decoder layer: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, norm1: nn.Module, attn: _Attention, norm2: nn.Module, mlp: _MLP) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                masks: dict[int | None, torch.Tensor], cache: StaticKVCache | None, positions: torch.Tensor,
                kv_len: int | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, masks[self.attn.window], cache, positions, kv_len)
        return x + self.mlp(self.norm2(x))


class FastCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM for generation, numerically equal to the source model it was built from.

    `forward` takes HF's arguments (`input_ids` or `inputs_embeds`, 2-D `attention_mask`,
    `position_ids`, `cache` or `past_key_values` (a `StaticKVCache`), `use_cache`,
    `logits_to_keep`) and returns a `CausalLMOutputWithPast` with `logits` and `cache`.
    """

    _supports_sdpa = True
    _supports_attention_backend = False

    def __init__(self, config: Any, *, embed: nn.Module, pos_embed: nn.Module | None, blocks: list[_Block],
                 norm: nn.Module, lm_head: nn.Module, lm_head_reduce: Reduce | None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None, head_dim: int, max_out_tokens: int) -> None:
        super().__init__(config)
        self.embed, self.pos_embed, self.norm, self.lm_head = embed, pos_embed, norm, lm_head
        self.blocks = nn.ModuleList(blocks)
        self.lm_head_reduce, self.head_dim, self.max_out_tokens = lm_head_reduce, head_dim, max_out_tokens
        self.rope_cos: torch.Tensor | None
        self.rope_sin: torch.Tensor | None
        self.register_buffer("rope_cos", rope[0] if rope is not None else None, persistent=False)
        self.register_buffer("rope_sin", rope[1] if rope is not None else None, persistent=False)
        self.kv_heads = [b.attn.kv_heads for b in blocks]
        self.windows = list(dict.fromkeys(b.attn.window for b in blocks))  # one mask per distinct window
        self.static_shapes = False  # set by compile_decode: attend over every slot, for one decode graph
        self._core: Callable[..., torch.Tensor] = self._run
        self._cache: StaticKVCache | None = None

    # --- cache -----------------------------------------------------------------------------

    def new_cache(self, batch_size: int) -> StaticKVCache:
        """A fresh cache for `batch_size` rows and `max_out_tokens` positions."""
        return StaticKVCache(self.kv_heads, batch_size, self.max_out_tokens, self.head_dim, self.dtype, self.device)

    def generation_cache(self, batch_size: int) -> StaticKVCache:
        """The cache `generate` uses, reset: reallocated only when the batch size, dtype or device
        changes, so repeated calls reuse the same buffers (and a compiled decode graph)."""
        if self._cache is None or self._cache.spec != (batch_size, self.max_out_tokens, self.dtype, self.device):
            self._cache = None  # free the old buffers before allocating the new ones
            self._cache = self.new_cache(batch_size)
        self._cache.reset()
        return self._cache

    # --- forward ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: StaticKVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, past_key_values: StaticKVCache | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        _check_kwargs(kwargs)
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("FastCausalLM.forward needs `input_ids` or `inputs_embeds`")
        batch, new = tokens.shape[:2]
        if cache is None and use_cache:
            cache = self.new_cache(batch)
        if cache is not None and not isinstance(cache, StaticKVCache):
            raise TypeError(f"the fast decode path keeps its keys and values in a StaticKVCache, got "
                            f"{type(cache).__name__}; pass none and use the returned `cache`")
        valid = attention_mask[:, -new:] if attention_mask is not None else None
        start = cache.length if cache is not None else 0
        if position_ids is None:  # HF's default: consecutive positions after the cached ones
            position_ids = torch.arange(start, start + new, device=tokens.device).unsqueeze(0)
        if cache is not None:
            positions = cache.advance(new, valid)
            key_valid, kv_len = cache.key_valid, (None if self.static_shapes else start + new)
        else:
            if new > self.max_out_tokens:
                raise ValueError(f"input of {new} tokens exceeds max_out_tokens={self.max_out_tokens}")
            positions = torch.arange(new, device=tokens.device)
            key_valid = valid.bool() if valid is not None else torch.ones(batch, new, dtype=torch.bool,
                                                                           device=tokens.device)
            kv_len = None
        logits = self._core(input_ids, inputs_embeds, position_ids, positions, key_valid, cache, kv_len,
                            logits_to_keep)
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def _run(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, position_ids: torch.Tensor,
             positions: torch.Tensor, key_valid: torch.Tensor, cache: StaticKVCache | None, kv_len: int | None,
             logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The tensor-only part of `forward` (what `compile_decode` compiles): embeddings, the layers
        (writing the cache at `positions`), the final norm and the LM head."""
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids)
        rope = None
        if self.rope_cos is not None and self.rope_sin is not None:
            # [batch or 1, new, 1, head_dim]: broadcast over the heads of a [batch, new, heads, head_dim] tensor
            rope = (self.rope_cos[position_ids].unsqueeze(2), self.rope_sin[position_ids].unsqueeze(2))
        if kv_len is not None:
            key_valid = key_valid[:, :kv_len]
        masks = {w: _attention_mask(key_valid, positions, w) for w in self.windows}
        for block in self.blocks:
            x = block(x, rope, masks, cache, positions, kv_len)
        logits = self.lm_head(slice_logits_to_keep(self.norm(x), logits_to_keep))
        return self.lm_head_reduce(logits) if self.lm_head_reduce is not None else logits

    def compile_decode(self, **compile_kwargs: Any) -> None:
        """Switch to static shapes and `torch.compile` the core (kwargs go to `torch.compile`; e.g.
        `mode="reduce-overhead"` adds CUDA graphs on a GPU). See the module docstring for what recompiles."""
        self.static_shapes = True
        self._core = torch.compile(self._run, **compile_kwargs)

    # --- generate hooks --------------------------------------------------------------------

    def _validate_generated_length(self, generation_config: Any, input_ids_length: int,
                                   has_default_max_length: bool) -> None:
        # HF annotates `self` as its GenerativePreTrainedModel protocol, which this class satisfies at run time.
        super()._validate_generated_length(generation_config, input_ids_length,  # type: ignore[misc]
                                           has_default_max_length)
        total = generation_config.max_length
        if input_ids_length > self.max_out_tokens:
            raise ValueError(f"input of {input_ids_length} tokens exceeds max_out_tokens={self.max_out_tokens}; "
                             "increase max_out_tokens (DeepSpeed's `max_tokens`) or shorten the input")
        if total > self.max_out_tokens:
            raise ValueError(f"generation would reach {total} tokens ({input_ids_length} input + up to "
                             f"{total - input_ids_length} new), more than max_out_tokens={self.max_out_tokens}; "
                             "increase max_out_tokens (DeepSpeed's `max_tokens`) or generate fewer tokens")

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict[str, Any],
                                      generation_mode: Any, batch_size: int, max_cache_length: int) -> bool:
        """Hand `generate` this model's StaticKVCache (or check the one the caller passed).
        Returns False, like HF's version (the value is not used)."""
        given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if given is not None:
            if not isinstance(given, StaticKVCache):
                raise TypeError("the fast decode path generates with its own StaticKVCache, "
                                f"got {type(given).__name__}")
        elif generation_config.use_cache is not False:
            rows = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
            model_kwargs["cache"] = self.generation_cache(rows)
        return False


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse what the fast path would silently ignore; accept HF's bookkeeping flags."""
    for key in ("output_attentions", "output_hidden_states"):
        if kwargs.pop(key, False):
            raise NotImplementedError(f"the fast decode path does not return `{key[7:]}`; use the source model")
    for key in ("token_type_ids", "labels"):
        if kwargs.pop(key, None) is not None:
            raise NotImplementedError(f"the fast decode path does not take `{key}`; use the source model")
    kwargs.pop("return_dict", None)
    if kwargs:
        raise TypeError(f"FastCausalLM.forward got unexpected arguments: {', '.join(sorted(kwargs))}")


# --- building ---------------------------------------------------------------------------------


def build_fast_model(model: nn.Module, max_out_tokens: int, tp: AxisGroup | None = None,
                     reduce: Reduce | None = None) -> FastCausalLM:
    """The fast decode model for `model` (see the module docstring), sharing its weights.

    `max_out_tokens`: the most tokens (prompt + generated) one sequence may hold; sizes the KV cache
    and the RoPE tables. `tp`: this rank's tensor-parallel group when `model` is sharded; `reduce`:
    the sum over it applied after row-parallel projections (default: an all-reduce over `tp.group`
    when `tp.size > 1`, else none).
    """
    kind = type(model).__name__
    if kind not in SUPPORTED:
        raise NotImplementedError(f"the fast decode path (replace_with_kernel_inject=True) supports "
                                  f"{', '.join(SUPPORTED)}; got {kind}. Use replace_with_kernel_inject=False")
    if not isinstance(max_out_tokens, int) or max_out_tokens < 1:
        raise ValueError(f"max_out_tokens must be a positive int, got {max_out_tokens!r}")
    if reduce is None and tp is not None and tp.size > 1:
        group = tp

        def reduce(x: torch.Tensor) -> torch.Tensor:
            return reduce_from_tp(x, group)

    source: Any = model  # one of the HF classes above
    parts = (_llama_parts if kind in _LLAMA_FAMILY else _gpt2_parts)(source, max_out_tokens, reduce)
    # A row-split head that all-reduces in its own forward (inference AutoTP's) needs no second reduction.
    lm_head_reduce = reduce if (getattr(source.lm_head, "tp_row_split", False)
                                and not getattr(source.lm_head, "reduces_output", False)) else None
    fast = FastCausalLM(copy.deepcopy(source.config), lm_head=source.lm_head, lm_head_reduce=lm_head_reduce,
                        max_out_tokens=max_out_tokens, **parts)
    fast.generation_config = copy.deepcopy(source.generation_config)
    return fast.eval()


def _llama_parts(model: Any, max_out_tokens: int, reduce: Reduce | None) -> dict[str, Any]:
    """Llama, Qwen2 and Mistral: RMSNorm, RoPE, fused QKV (with Qwen2's biases), gated MLP."""
    config, inner = model.config, model.model
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if any(name in rope_type for name in _RUNTIME_ROPE):
        raise NotImplementedError(f"the fast decode path precomputes RoPE tables; rope_type {rope_type!r} "
                                  "changes frequencies with the sequence length. Use replace_with_kernel_inject=False")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None)
    blocks = []
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        sliding = layer_types[i] == "sliding_attention" if layer_types else True
        window = getattr(config, "sliding_window", None) if sliding else None
        qkv = _Proj.fused([attn.q_proj, attn.k_proj, attn.v_proj])
        fast_attn = _Attention(qkv, _Proj.of(attn.o_proj), head_dim, attn.k_proj.weight.shape[0] // head_dim,
                               attn.scaling, window, i, reduce)
        fast_mlp = _MLP(_Proj.fused([mlp.gate_proj, mlp.up_proj]), _Proj.of(mlp.down_proj), mlp.act_fn, True, reduce)
        blocks.append(_Block(layer.input_layernorm, fast_attn, layer.post_attention_layernorm, fast_mlp))
    ref = inner.embed_tokens.weight
    positions = torch.arange(max_out_tokens, device=ref.device)[None]
    cos, sin = inner.rotary_emb(torch.zeros(1, device=ref.device), positions)
    rope = (cos[0].to(ref.dtype), sin[0].to(ref.dtype))
    return dict(embed=inner.embed_tokens, pos_embed=None, blocks=blocks, norm=inner.norm, rope=rope, head_dim=head_dim)


def _gpt2_parts(model: Any, max_out_tokens: int, reduce: Reduce | None) -> dict[str, Any]:
    """GPT-2: LayerNorm, learned positions, the already fused `c_attn`, a plain MLP."""
    config, inner = model.config, model.transformer
    if max_out_tokens > config.n_positions:
        raise ValueError(f"max_out_tokens={max_out_tokens} exceeds GPT-2's {config.n_positions} learned positions")
    if config.reorder_and_upcast_attn and config._attn_implementation == "eager":
        raise NotImplementedError("GPT-2 with reorder_and_upcast_attn under eager attention is not supported "
                                  "by the fast decode path")
    head_dim = config.n_embd // config.n_head
    blocks = []
    for i, layer in enumerate(inner.h):
        attn, mlp = layer.attn, layer.mlp
        qkv = _Proj.of(attn.c_attn)
        if qkv.out_features % (3 * head_dim):
            raise ValueError(f"layer {i}: c_attn output {qkv.out_features} is not 3 x whole heads of size {head_dim}")
        kv_heads = qkv.out_features // (3 * head_dim)
        fast_attn = _Attention(qkv, _Proj.of(attn.c_proj), head_dim, kv_heads, attn.scaling, None, i, reduce)
        fast_mlp = _MLP(_Proj.of(mlp.c_fc), _Proj.of(mlp.c_proj), mlp.act, False, reduce)
        blocks.append(_Block(layer.ln_1, fast_attn, layer.ln_2, fast_mlp))
    return dict(embed=inner.wte, pos_embed=inner.wpe, blocks=blocks, norm=inner.ln_f, rope=None, head_dim=head_dim)
