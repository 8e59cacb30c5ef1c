"""Tensor parallelism: Megatron-style layers, the vocabulary-parallel cross-entropy, and AutoTP
for Hugging Face GPT-2 and Llama (`tensor_parallel.autotp_size` in the config)."""
from .auto_tp import SUPPORTED, auto_tp
from .cross_entropy import CausalLMLoss, vocab_parallel_cross_entropy
from .layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead,
                     is_tensor_parallel, mark_tensor_parallel, split_range)
from .comm import as_tp_group, copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp

__all__ = ["SUPPORTED", "CausalLMLoss", "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "VocabParallelLMHead", "as_tp_group", "auto_tp", "copy_to_tp", "gather_from_tp", "is_tensor_parallel",
           "mark_tensor_parallel", "reduce_from_tp", "scatter_to_tp", "split_range", "vocab_parallel_cross_entropy"]
