"""AutoTP for training: shard a supported Hugging Face model's layers across a tensor-parallel group.

Per decoder block, the attention and MLP become column-then-row pairs (one all-reduce each way):

    GPT-2   attn.c_attn (fused QKV, stride 3) -> attn.c_proj;   mlp.c_fc -> mlp.c_proj
    Llama   self_attn.{q,k,v}_proj -> self_attn.o_proj;      mlp.{gate,up}_proj -> mlp.down_proj

The token embedding is split by vocabulary rows, the LM head too (sharing the embedding's weight
when tied), and the model's `loss_function` becomes the vocabulary-parallel cross-entropy: the
full logits never exist, and `outputs.logits` holds this rank's vocabulary slice. Layer norms and
position embeddings stay replicated. The model's weights must be the same on every rank before
sharding; `auto_tp` makes them so (a broadcast from rank 0). It also gives every rank of a
tensor-parallel group the same torch RNG state: dropout on replicated activations must draw the
same mask on each of them, or the replicas drift apart silently.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..comm.topology import AxisGroup
from ..config.errors import ConfigError
from .comm import copy_to_tp
from .cross_entropy import CausalLMLoss
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead

SUPPORTED = ("gpt2", "llama")


def auto_tp(model: nn.Module, tp: AxisGroup, key: str = "tensor_parallel.autotp_size") -> nn.Module:
    """Shard `model` (in place) across `tp`; returns it. Collective over every rank. `key`: the config
    key the size came from, as the user wrote it (for error messages)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in _PLANS:
        raise ConfigError(f"`{key}`: AutoTP supports Hugging Face model types {', '.join(SUPPORTED)}; "
                         f"{type(model).__name__} has model_type {model_type!r}. Shard it with shardspeed.tensor_parallel's "
                         f"layers and pass initialize(mpu=...), or set {key} to 1")
    _make_identical(model)
    if tp.size == 1:
        return model
    _PLANS[model_type](model, config, tp, key)
    _shard_vocabulary(model, tp)
    _same_rng_state(tp)
    return model


def _same_rng_state(tp: AxisGroup) -> None:
    """The tensor group's first rank's torch RNG state on all of its ranks (with NCCL, the CUDA one's too)."""
    device = _comm_device(tp.group)
    states = [torch.get_rng_state().to(device)]
    if device.type == "cuda":  # NCCL implies CUDA training: its dropout draws from the CUDA generator
        states.append(torch.cuda.get_rng_state().to(device))
    for state in states:
        dist.broadcast(state, src=tp.ranks[0], group=tp.group)
    torch.set_rng_state(states[0].cpu())
    if len(states) > 1:
        torch.cuda.set_rng_state(states[1].cpu())


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where a tensor must be for a collective on `group`: NCCL moves CUDA tensors only (the model is
    still on the host when AutoTP runs)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _make_identical(model: nn.Module) -> None:
    """Rank 0's weights everywhere, so every tensor-parallel rank shards the same model: one
    broadcast per dtype of everything flattened (not one per tensor)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        by_dtype.setdefault(tensor.dtype, []).append(tensor.data)
    with torch.no_grad():
        for dtype in sorted(by_dtype, key=str):  # the same order on every rank
            tensors = by_dtype[dtype]
            flat = torch.cat([t.reshape(-1) for t in tensors]).to(_comm_device(None))
            dist.broadcast(flat, src=0)
            offset = 0
            for t in tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))  # back to wherever the model lives
                offset += t.numel()


def _require_divisible(what: str, value: int, tp: AxisGroup, key: str) -> None:
    if value % tp.size:
        raise ConfigError(f"`{key}` {tp.size} does not divide the model's {what} ({value}); "
                         "choose a size that divides it")


def _gpt2(model: nn.Module, config: Any, tp: AxisGroup, key: str) -> None:
    if getattr(config, "add_cross_attention", False):
        raise ConfigError(f"AutoTP (`{key}`) does not shard GPT-2's cross-attention (config.add_cross_attention); turn it off")
    _require_divisible("number of attention heads (n_head)", config.n_head, tp, key)
    for block in _blocks(model, "GPT2Block"):
        attn, mlp = block.attn, block.mlp
        attn.c_attn = ColumnParallelLinear.from_dense(attn.c_attn, tp, stride=3, transposed=True)
        attn.c_proj = RowParallelLinear.from_dense(attn.c_proj, tp, transposed=True)
        attn.num_heads //= tp.size
        attn.split_size //= tp.size
        attn.embed_dim //= tp.size
        _require_divisible("MLP width (n_inner)", mlp.c_fc.weight.shape[1], tp, key)
        mlp.c_fc = ColumnParallelLinear.from_dense(mlp.c_fc, tp, transposed=True)
        mlp.c_proj = RowParallelLinear.from_dense(mlp.c_proj, tp, transposed=True)


def _llama(model: nn.Module, config: Any, tp: AxisGroup, key: str) -> None:
    _require_divisible("number of attention heads", config.num_attention_heads, tp, key)
    _require_divisible("number of key/value heads", config.num_key_value_heads, tp, key)
    _require_divisible("intermediate_size", config.intermediate_size, tp, key)
    for block in _blocks(model, "LlamaDecoderLayer"):
        attn, mlp = block.self_attn, block.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear.from_dense(getattr(attn, name), tp))
        attn.o_proj = RowParallelLinear.from_dense(attn.o_proj, tp)
        for name in ("gate_proj", "up_proj"):
            setattr(mlp, name, ColumnParallelLinear.from_dense(getattr(mlp, name), tp))
        mlp.down_proj = RowParallelLinear.from_dense(mlp.down_proj, tp)
        # q, k, v (and gate, up) read one input: all-reduce its summed gradient once, as Megatron's fused layers do.
        _copy_input_once(attn, [attn.q_proj, attn.k_proj, attn.v_proj], tp)
        _copy_input_once(mlp, [mlp.gate_proj, mlp.up_proj], tp)


def _copy_input_once(module: nn.Module, columns: list[ColumnParallelLinear], tp: AxisGroup) -> None:
    """`module`'s hidden-state input goes through copy_to_tp once, on entry, instead of in each of
    `columns`. Only for modules that use that input for nothing but those layers (otherwise the other
    uses' gradient would be all-reduced too): Llama's attention and MLP."""
    for layer in columns:
        layer.copy_input = False

    def copy_on_entry(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (copy_to_tp(args[0], tp), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": copy_to_tp(kwargs["hidden_states"], tp)}

    module.register_forward_pre_hook(copy_on_entry, with_kwargs=True)


def _blocks(model: nn.Module, class_name: str) -> list[Any]:
    """The model's decoder blocks: Hugging Face classes this module does not import, whose layers
    and sizes (attn.c_attn, attn.num_heads, ...) are plain attributes unknown to nn.Module."""
    blocks = [m for m in model.modules() if type(m).__name__ == class_name]
    if not blocks:
        raise ValueError(f"AutoTP found no {class_name} in {type(model).__name__}; is this a standard Hugging Face model?")
    return blocks


def _shard_vocabulary(model: Any, tp: AxisGroup) -> None:
    """`model`: a Hugging Face PreTrainedModel (its embedding accessors and loss_function are not nn.Module's)."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and head.weight is embedding.weight
    sharded = VocabParallelEmbedding.from_dense(embedding, tp)
    model.set_input_embeddings(sharded)
    if head is None:
        return
    if tied:
        new_head = VocabParallelLMHead(sharded.weight, sharded.vocab_start, sharded.vocab_end, sharded.num_embeddings, tp)
    else:
        new_head = VocabParallelLMHead.from_dense(head, tp)
    model.set_output_embeddings(new_head)
    model.loss_function = CausalLMLoss(new_head.vocab_start, tp)


# The config is the model's Hugging Face config: its fields differ per model type.
_PLANS: dict[str, Callable[[nn.Module, Any, AxisGroup, str], None]] = {"gpt2": _gpt2, "llama": _llama}
