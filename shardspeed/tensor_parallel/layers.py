"""Megatron-style tensor-parallel layers over one tensor-parallel group.

    ColumnParallelLinear   Y = X A, A split by output columns: each rank computes a slice of Y
    RowParallelLinear      Y = X A, A split by input rows: each rank's partial Y is summed
    VocabParallelEmbedding the table split by vocabulary rows; a rank looks up the ids it owns
    VocabParallelLMHead    logits for this rank's vocabulary rows only (feed them to
                           `vocab_parallel_cross_entropy`; the full logits are never formed)

A column layer followed by a row layer (attention's QKV then output projection, an MLP's up then
down projection) needs one all-reduce forward and one backward. Sharded parameters carry
Megatron's marks (`tensor_model_parallel`, `partition_dim`, `partition_stride`): the gradient norm
counts them on every rank and the replicated ones on one rank, and `consolidate` reassembles them.

Weights may be kept in `nn.Linear`'s [out, in] layout or, for Hugging Face's GPT-2 `Conv1D`, in
its [in, out] layout (`transposed=True`), so a consolidated state dict loads back into the
original model unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..comm.topology import AxisGroup
from .comm import as_tp_group, copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part `index` when `total` rows are split as evenly as possible (earlier parts get the extra)."""
    base, extra = divmod(total, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def mark_tensor_parallel(param: nn.Parameter, partition_dim: int, stride: int = 1) -> nn.Parameter:
    """Megatron's attributes for a parameter split across the tensor-parallel group."""
    # Set by name: they are Megatron's ad-hoc marks, read back with getattr, not Parameter attributes.
    setattr(param, "tensor_model_parallel", True)
    setattr(param, "partition_dim", partition_dim)
    setattr(param, "partition_stride", stride)
    return param


def is_tensor_parallel(param: torch.Tensor) -> bool:
    """Split across the tensor-parallel group (Megatron's `tensor_model_parallel` or older `model_parallel` mark)."""
    return bool(getattr(param, "tensor_model_parallel", False) or getattr(param, "model_parallel", False))


def cut(whole: torch.Tensor, dim: int, stride: int, tp: AxisGroup) -> torch.Tensor:
    """This rank's part of `whole` along `dim` (a copy): with stride 1 as evenly as possible
    (`split_range`), otherwise this rank's part of each of `stride` equal blocks (fused QKV)."""
    if stride == 1:
        start, end = split_range(whole.shape[dim], tp.size, tp.rank)
        return whole.narrow(dim, start, end - start).detach().clone()
    blocks = whole.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp.size, dim=dim)[tp.rank] for b in blocks], dim=dim).detach().clone()


def shard(full: torch.Tensor, dim: int, tp: AxisGroup, stride: int = 1, what: str = "tensor") -> torch.Tensor:
    """`cut`, for a linear layer's weight: every rank's part must be the same size."""
    size = full.shape[dim]
    if size % (stride * tp.size):
        raise ValueError(f"{what}: dimension {dim} of size {size} does not split into {stride} block(s) x "
                         f"{tp.size} tensor-parallel ranks; choose a tensor-parallel size that divides it")
    return cut(full, dim, stride, tp)


class DenseLayer(Protocol):
    """What `from_dense` reads of a dense layer: nn.Linear, or Hugging Face's [in, out] Conv1D."""

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def bias(self) -> torch.Tensor | None: ...


def _default_weight(out_features: int, in_features: int, bias: bool, dtype: Any, device: Any,
                    init_method: Callable[[torch.Tensor], Any] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full weight and bias an unsharded nn.Linear would start from (same RNG draws), before sharding."""
    full = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
    if init_method is not None:
        init_method(full.weight)
    return full.weight.detach(), full.bias.detach() if bias else None


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A's output columns split across the tensor-parallel group.

    `gather_output=True` all-gathers Y (every rank gets the whole output); False leaves each rank
    its slice, ready for a `RowParallelLinear(input_is_parallel=True)`. With `skip_bias_add` the
    bias is returned instead of added: `(Y, b)`.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True, *,
                 tp_group: AxisGroup | dist.ProcessGroup | None = None, init_method: Callable[[torch.Tensor], Any] | None = None,
                 skip_bias_add: bool = False, stride: int = 1, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        weight, b = _default_weight(output_size, input_size, bias, dtype, device, init_method)
        self._setup(weight, b, as_tp_group(tp_group), gather_output, skip_bias_add, stride, transposed=False)

    @classmethod
    def from_dense(cls, layer: DenseLayer, tp_group: AxisGroup | dist.ProcessGroup | None, gather_output: bool = False,
                   stride: int = 1, transposed: bool = False) -> "ColumnParallelLinear":
        """This rank's shard of an existing dense layer (nn.Linear, or a [in, out] Conv1D with transposed=True)."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None, as_tp_group(tp_group),
                   gather_output, False, stride, transposed)
        return obj

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: AxisGroup, gather_output: bool,
               skip_bias_add: bool, stride: int, transposed: bool) -> None:
        if gather_output and stride > 1:
            raise ValueError("gather_output needs stride 1: a strided (fused) output gathers in the wrong order")
        self.tp, self.gather_output, self.skip_bias_add, self.transposed = tp, gather_output, skip_bias_add, transposed
        # False when the caller already passed the input through copy_to_tp for several column
        # layers that read it (one backward all-reduce of their summed input gradient, not one each).
        self.copy_input = True
        out_dim = 1 if transposed else 0
        self.input_size = weight.shape[1 - out_dim]
        self.output_size = weight.shape[out_dim]
        what = f"{type(self).__name__} weight {tuple(weight.shape)}"
        self.weight = mark_tensor_parallel(nn.Parameter(shard(weight, out_dim, tp, stride, what)), out_dim, stride)
        self.bias = mark_tensor_parallel(nn.Parameter(shard(bias, 0, tp, stride, what)), 0, stride) if bias is not None else None

    def forward(self, x: torch.Tensor) -> Any:
        if self.copy_input:
            x = copy_to_tp(x, self.tp)
        bias = None if self.skip_bias_add else self.bias
        y = _matmul(x, self.weight, bias, self.transposed)
        if self.gather_output:
            y = gather_from_tp(y, self.tp)
        return (y, self.bias) if self.skip_bias_add else y

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (this rank: {self.weight.shape[1 if self.transposed else 0]}), "
                f"tp={self.tp.size}, gather_output={self.gather_output}")


class RowParallelLinear(nn.Module):
    """Y = X A + b with A's input rows split across the tensor-parallel group; partial products are summed.

    `input_is_parallel=True` takes X already split (a column layer's output); otherwise each rank
    keeps its slice of X's last dimension. The bias is replicated and added once, after the sum.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False, *,
                 tp_group: AxisGroup | dist.ProcessGroup | None = None, init_method: Callable[[torch.Tensor], Any] | None = None,
                 skip_bias_add: bool = False, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        weight, b = _default_weight(output_size, input_size, bias, dtype, device, init_method)
        self._setup(weight, b, as_tp_group(tp_group), input_is_parallel, skip_bias_add, transposed=False)

    @classmethod
    def from_dense(cls, layer: DenseLayer, tp_group: AxisGroup | dist.ProcessGroup | None, input_is_parallel: bool = True,
                   transposed: bool = False) -> "RowParallelLinear":
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(layer.weight.detach(), layer.bias.detach() if layer.bias is not None else None, as_tp_group(tp_group),
                   input_is_parallel, False, transposed)
        return obj

    def _setup(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: AxisGroup, input_is_parallel: bool,
               skip_bias_add: bool, transposed: bool) -> None:
        self.tp, self.input_is_parallel, self.skip_bias_add, self.transposed = tp, input_is_parallel, skip_bias_add, transposed
        in_dim = 0 if transposed else 1
        self.input_size = weight.shape[in_dim]
        self.output_size = weight.shape[1 - in_dim]
        what = f"{type(self).__name__} weight {tuple(weight.shape)}"
        self.weight = mark_tensor_parallel(nn.Parameter(shard(weight, in_dim, tp, 1, what)), in_dim)
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> Any:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.tp)
        y = reduce_from_tp(_matmul(x, self.weight, None, self.transposed), self.tp)
        if self.skip_bias_add:
            return y, self.bias
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in={self.input_size} (this rank: {self.weight.shape[0 if self.transposed else 1]}), out={self.output_size}, tp={self.tp.size}"


def _matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if not transposed:
        return F.linear(x, weight, bias)
    y = x @ weight  # Conv1D's layout: weight is [in, out]
    return y + bias if bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows (as evenly as possible; the vocabulary need not divide).

    Each rank looks up the ids in its range and writes zeros for the rest; one all-reduce sums the rows.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None, *,
                 tp_group: AxisGroup | dist.ProcessGroup | None = None, init_method: Callable[[torch.Tensor], Any] | None = None,
                 dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        full = nn.Embedding(num_embeddings, embedding_dim, padding_idx=padding_idx, dtype=dtype, device=device)
        if init_method is not None:
            init_method(full.weight)
        self._setup(full.weight.detach(), padding_idx, as_tp_group(tp_group))

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, tp_group: AxisGroup | dist.ProcessGroup | None) -> "VocabParallelEmbedding":
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        obj._setup(embedding.weight.detach(), embedding.padding_idx, as_tp_group(tp_group))
        return obj

    def _setup(self, weight: torch.Tensor, padding_idx: int | None, tp: AxisGroup) -> None:
        self.tp = tp
        self.num_embeddings, self.embedding_dim = weight.shape
        self.vocab_start, self.vocab_end = split_range(self.num_embeddings, tp.size, tp.rank)
        self.weight = mark_tensor_parallel(nn.Parameter(cut(weight, 0, 1, tp)), 0)
        self.padding_idx = padding_idx
        self._local_padding_idx: int | None = None
        if padding_idx is not None and self.vocab_start <= padding_idx < self.vocab_end:
            self._local_padding_idx = padding_idx - self.vocab_start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight, self._local_padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        rows = F.embedding(local, self.weight, self._local_padding_idx).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(rows, self.tp)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}) on this rank, tp={self.tp.size}"


class VocabParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary rows: [..., vocab_end - vocab_start]. Shares an embedding's
    weight when the model ties them (GPT-2, tied Llama), so the tie survives sharding."""

    def __init__(self, weight: nn.Parameter, vocab_start: int, vocab_end: int, vocab_size: int, tp: AxisGroup,
                 bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if weight.shape[0] != vocab_end - vocab_start:
            raise ValueError(f"LM head weight has {weight.shape[0]} rows for vocabulary rows [{vocab_start}, {vocab_end})")
        self.weight, self.bias = weight, bias
        self.vocab_start, self.vocab_end, self.vocab_size, self.tp = vocab_start, vocab_end, vocab_size, tp

    @classmethod
    def from_dense(cls, head: nn.Linear, tp: AxisGroup) -> "VocabParallelLMHead":
        vocab = head.weight.shape[0]
        start, end = split_range(vocab, tp.size, tp.rank)
        weight = mark_tensor_parallel(nn.Parameter(cut(head.weight, 0, 1, tp)), 0)
        bias = mark_tensor_parallel(nn.Parameter(cut(head.bias, 0, 1, tp)), 0) if head.bias is not None else None
        return cls(weight, start, end, vocab, tp, bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(hidden, self.tp), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"vocab rows [{self.vocab_start}, {self.vocab_end}) of {self.vocab_size}, tp={self.tp.size}"


__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelLMHead",
           "cut", "is_tensor_parallel", "mark_tensor_parallel", "shard", "split_range"]
