"""The fast decode path's KV cache: one preallocated buffer per layer, written in place.

Each layer holds keys and values of shape [batch, kv_heads, max_len, head_dim], allocated once;
`kv_heads` is this rank's count under tensor parallelism (it may differ between layers' owners but
not between steps). A decode step writes its new keys and values with `index_copy_` at the cache
positions the step was given, so no cache tensor is allocated or grown after construction and the
buffers keep their addresses (what `torch.compile` and CUDA graphs need). `key_valid[b, t]` says
whether slot t of row b holds a real token (False for left padding and for unwritten slots).

It implements Hugging Face's `transformers.cache_utils.Cache` interface as far as `generate` uses it:
`get_seq_length`, `reorder_cache` (beam search, in place through one scratch buffer), `crop`
(negative counts), `reset`. Changing the batch size (`batch_repeat_interleave`,
`batch_select_indices`) is refused: the shapes are static by design.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class StaticKVLayer(CacheLayerMixin):
    """One layer's preallocated keys and values. Its length is the owning cache's."""

    # HF's `generate` builds 4-D masks and auto-compiles for "compileable" caches; the fast model
    # builds its own masks from `key_valid` and is compiled by its owner instead.
    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, owner: StaticKVCache) -> None:
        super().__init__()
        self.keys, self.values, self._owner = keys, values, owner
        self.k_buf, self.v_buf = keys, values  # the same tensors, typed as never None
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the buffers exist from construction."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("a StaticKVCache is written by shardspeed's fast decode model only "
                                  "(FastCausalLM), not by a Hugging Face model's attention layers")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.max_len, 0

    def get_seq_length(self) -> int:
        return self._owner.length

    def get_max_length(self) -> int:
        return self._owner.max_len

    def reset(self) -> None:
        """Slots are invalidated through the owner's `key_valid`; the values need no zeroing."""


class StaticKVCache(Cache):
    """Keys and values of every layer for `batch_size` rows and up to `max_len` positions."""

    def __init__(self, kv_heads: Sequence[int], batch_size: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        def buffer(heads: int) -> torch.Tensor:
            return torch.zeros(batch_size, heads, max_len, head_dim, dtype=dtype, device=device)

        self.kv_layers = [StaticKVLayer(buffer(h), buffer(h), self) for h in kv_heads]
        super().__init__(layers=list(self.kv_layers))
        self.max_len, self.length = max_len, 0
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        # Beam search reorders rows through this one buffer (the size of one layer's keys), so
        # reordering allocates nothing and leaves every cache buffer at its address.
        self._scratch = torch.empty(batch_size * max(kv_heads) * max_len * head_dim, dtype=dtype, device=device)
        self.spec = (batch_size, max_len, dtype, torch.device(device))
        # Fixed addresses let a compiled decode step (and CUDA graphs) mutate them without copies.
        for t in self.buffers():
            torch._dynamo.mark_static_address(t)

    def buffers(self) -> list[torch.Tensor]:
        """Every cache tensor, for checks that they keep their storage."""
        return [self.key_valid] + [t for layer in self.kv_layers for t in (layer.k_buf, layer.v_buf)]

    def advance(self, new_tokens: int, valid: torch.Tensor | None) -> torch.Tensor:
        """Claim the next `new_tokens` slots; returns their positions. `valid` ([batch, new_tokens],
        nonzero for real tokens; None for all real) marks which of them later queries may attend to."""
        start = self.length
        if start + new_tokens > self.max_len:
            raise ValueError(f"the fast decode path holds at most max_out_tokens={self.max_len} tokens per "
                             f"sequence; {start} cached + {new_tokens} new = {start + new_tokens}. Increase "
                             f"max_out_tokens (DeepSpeed's `max_tokens`) or shorten the input or generation")
        window = self.key_valid[:, start:start + new_tokens]
        if valid is None:
            window.fill_(True)
        else:
            window.copy_(valid)
        self.length = start + new_tokens
        return torch.arange(start, start + new_tokens, device=self.key_valid.device)

    def write(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
              kv_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `keys`/`values` ([batch, kv_heads, new, head_dim]) at `positions`; returns the cached
        keys and values to attend over: the first `kv_len` slots, or all `max_len` when None."""
        layer = self.kv_layers[layer_idx]
        layer.k_buf.index_copy_(2, positions, keys)
        layer.v_buf.index_copy_(2, positions, values)
        if kv_len is None:
            return layer.k_buf, layer.v_buf
        return layer.k_buf[:, :, :kv_len], layer.v_buf[:, :, :kv_len]

    # --- Hugging Face `Cache` interface -------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return self.max_len, 0

    def reset(self) -> None:
        self.length = 0
        self.key_valid.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes old row beam_idx[i] (beam search), in place over the written slots."""
        n = self.length
        if n == 0:
            return
        index = beam_idx.to(self.key_valid.device)
        for layer in self.kv_layers:
            for buf in (layer.k_buf, layer.v_buf):
                live = buf[:, :, :n]
                tmp = self._scratch[:live.numel()].view(live.shape)
                torch.index_select(live, 0, index, out=tmp)
                live.copy_(tmp)
        self.key_valid.copy_(self.key_valid.index_select(0, index))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (HF's convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"StaticKVCache.crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        self.length -= min(-tokens_to_remove, self.length)
        self.key_valid[:, self.length:].zero_()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the fast decode path's KV cache has a fixed batch size; "
                                  "this generation mode changes it (use greedy, sampling or beam search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.batch_repeat_interleave(0)

    @property
    def batch_size(self) -> int:
        return self.key_valid.shape[0]
