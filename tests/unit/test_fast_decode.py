"""The fast decode path (shardspeed.inference.fast_decode) against Hugging Face's own models.

Tiny random-weight Llama (grouped-query heads), Qwen2 (QKV biases), Mistral (with and without a
sliding window) and GPT-2, fp32 on CPU. The fast path re-implements the forward, so equality is
the whole proof: logits within 1e-5 of HF, and HF's `generate` (dynamic cache) reproduced token
for token for greedy, seeded sampling and beam search, with left-padded batches.
"""
from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, OPTConfig, OPTForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from shardspeed.inference.fast_decode import FastCausalLM, build_fast_model
from shardspeed.inference.static_cache import StaticKVCache

VOCAB, MAX_OUT = 128, 64
_TOKENS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, **_TOKENS)

MAKERS: dict[str, Callable[[], Any]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=None)),
    "mistral_window8": lambda: MistralForCausalLM(MistralConfig(**_DECODER, sliding_window=8)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                                               **_TOKENS)),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models gain nothing from a second intra-op thread, and lose much when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(MAKERS))
def pair(request: pytest.FixtureRequest) -> tuple[Any, FastCausalLM]:
    torch.manual_seed(0)
    hf = MAKERS[request.param]().eval()
    return hf, build_fast_model(hf, MAX_OUT)


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of 5, 9 and 12 tokens (pad id 0)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    mask[1, :3] = 0
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def test_logits_match_hf(pair: tuple[Any, FastCausalLM]) -> None:
    """Catches a wrong fusion order, RoPE table, norm, scale or mask: every real position's logits."""
    hf, fast = pair
    ids, mask = _prompts()
    expected = hf(ids, attention_mask=mask).logits
    for use_cache in (False, True):  # without a cache, and written into a fresh StaticKVCache
        got = fast(ids, attention_mask=mask, use_cache=use_cache).logits
        # 1e-5: the same fp32 operations in the same order; only kernel choices could differ.
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=0, atol=1e-5)
    unpadded = hf(ids[2:]).logits
    torch.testing.assert_close(fast(ids[2:], use_cache=False).logits, unpadded, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["greedy", "greedy_no_cache", "sample", "beams", "beams_return2"])
def test_generate_matches_hf(pair: tuple[Any, FastCausalLM], mode: str) -> None:
    """Catches cache writes at wrong slots, padding leaking into attention, beam reordering of the
    wrong rows: HF's own `generate` on the source model is the reference, token for token."""
    hf, fast = pair
    ids, mask = _prompts()
    kwargs: dict[str, Any] = {
        "greedy": dict(do_sample=False),
        "greedy_no_cache": dict(do_sample=False, use_cache=False),
        "sample": dict(do_sample=True, top_k=0),
        "beams": dict(num_beams=3, do_sample=False),
        "beams_return2": dict(num_beams=3, num_return_sequences=2, do_sample=False),
    }[mode]
    new = 8 if mode == "greedy_no_cache" else 32
    outputs = []
    for model in (hf, fast):
        torch.manual_seed(123)
        outputs.append(model.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0, **kwargs))
    assert torch.equal(outputs[0], outputs[1])
    if mode == "greedy":  # one unpadded prompt too
        single = [m.generate(ids[2:], max_new_tokens=new, do_sample=False) for m in (hf, fast)]
        assert torch.equal(single[0], single[1])


def _record_cache_addresses(fast: FastCausalLM) -> tuple[list[tuple[int, ...]], Any]:
    seen: list[tuple[int, ...]] = []

    def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        assert isinstance(output.cache, StaticKVCache)
        seen.append(tuple(t.data_ptr() for t in output.cache.buffers()))

    return seen, fast.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_decode_steps_keep_cache_buffers(num_beams: int) -> None:
    """Catches per-step cache allocation (torch.cat growth, out-of-place beam reordering): every
    forward of two `generate` calls sees the same cache tensors at the same addresses."""
    torch.manual_seed(0)
    fast = build_fast_model(MAKERS["llama"]().eval(), MAX_OUT)
    ids, mask = _prompts()
    seen, handle = _record_cache_addresses(fast)
    try:
        for _ in range(2):
            fast.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, num_beams=num_beams)
    finally:
        handle.remove()
    assert len(seen) == 2 * 16
    assert len(set(seen)) == 1


def test_too_long_input_or_generation_names_both_numbers() -> None:
    """Catches a silent overflow of the static cache (or a message that hides the limit)."""
    torch.manual_seed(0)
    fast = build_fast_model(MAKERS["llama"]().eval(), 16)
    ids = torch.randint(3, VOCAB, (1, 20))
    with pytest.raises(ValueError, match=r"input of 20 tokens exceeds max_out_tokens=16"):
        fast.generate(ids, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"reach 20 tokens .*max_out_tokens=16"):
        fast.generate(ids[:, :10], max_new_tokens=10)
    out = fast(ids[:, :10])  # forward with a cache: 10 slots used, 6 left
    with pytest.raises(ValueError, match=r"max_out_tokens=16.*10 cached \+ 8 new = 18"):
        fast(ids[:, :8], cache=out.cache)
    with pytest.raises(ValueError, match=r"input of 20 tokens exceeds max_out_tokens=16"):
        fast(ids, use_cache=False)


def test_unsupported_model_class_is_named() -> None:
    """Catches a model class silently run through the wrong re-implementation."""
    opt = OPTForCausalLM(OPTConfig(hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                   vocab_size=VOCAB, word_embed_proj_dim=16))
    with pytest.raises(NotImplementedError, match=r"supports LlamaForCausalLM, .*GPT2LMHeadModel; got OPTForCausalLM"):
        build_fast_model(opt, MAX_OUT)


def test_weights_are_shared_not_copied() -> None:
    """Catches a fused QKV that doubles weight memory: the source's q/k/v become views of it."""
    torch.manual_seed(0)
    hf = MAKERS["qwen2"]().eval()
    fast = build_fast_model(hf, MAX_OUT)
    attn, fused = hf.model.layers[0].self_attn, fast.blocks[0].attn.qkv
    assert attn.q_proj.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    assert attn.v_proj.bias.untyped_storage().data_ptr() == fused.bias.untyped_storage().data_ptr()
    assert fast.lm_head is hf.lm_head


@torch.no_grad()
def test_bf16_logits_close_to_fp32_reference() -> None:
    """Catches RoPE tables, cache or masks left in fp32 (a dtype error) or built in the wrong dtype."""
    torch.manual_seed(0)
    hf = MAKERS["llama"]().eval()
    ids, mask = _prompts()
    reference = hf(ids, attention_mask=mask).logits
    fast = build_fast_model(hf.to(torch.bfloat16), MAX_OUT)
    got = fast(ids, attention_mask=mask).logits.float()
    # 2e-2: bf16 keeps 8 mantissa bits; two layers of rounding on O(0.1) activations stay well inside.
    torch.testing.assert_close(got[mask.bool()], reference[mask.bool()], rtol=0, atol=2e-2)


def test_compiled_decode_is_one_graph() -> None:
    """Catches shape- or value-dependent Python in the decode step: under torch.compile
    (fullgraph, so a graph break fails), one generate compiles a prefill graph and one decode
    graph, and a second identical generate compiles nothing."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    hf = MAKERS["llama"]().eval()
    fast = build_fast_model(hf, MAX_OUT)
    ids, mask = _prompts()
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    torch._dynamo.reset()
    counters.clear()
    fast.compile_decode(backend="eager", fullgraph=True)
    try:
        for expected_graphs in (2, 2):
            got = fast.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
            assert torch.equal(got, expected)
            assert counters["stats"]["unique_graphs"] == expected_graphs
    finally:
        torch._dynamo.reset()


# --- tensor parallelism, simulated with two threads -------------------------------------------


class _ThreadSum:
    """An all-reduce between threads: every rank gets rank 0's tensor + rank 1's, in that order."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * ranks

    def reducer(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x
            self.barrier.wait()
            total = sum(s for s in self.slots if s is not None)
            self.barrier.wait()  # every rank has read the slots before any overwrites its own
            assert isinstance(total, torch.Tensor)
            return total

        return reduce


class _RowSplitHead(nn.Module):
    """An LM head holding input features [start, stop): partial logits, summed by `reduce`."""

    tp_row_split = True

    def __init__(self, weight: torch.Tensor, start: int, stop: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight[:, start:stop].clone())
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.start:self.stop] @ self.weight.t()


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None and out.bias is not None:
            out.bias.copy_(bias)
    return out


def _shard_llama(hf: LlamaForCausalLM, kv: tuple[int, int], inter: tuple[int, int], hidden: tuple[int, int]) -> Any:
    """One rank's copy of `hf` as inference AutoTP leaves it: KV heads [kv) with their query heads,
    intermediate features [inter), o_proj/down_proj input slices (full bias), a row-split LM head."""
    model = copy.deepcopy(hf)
    d = hf.config.head_dim
    group = hf.config.num_attention_heads // hf.config.num_key_value_heads
    q, k = slice(kv[0] * group * d, kv[1] * group * d), slice(kv[0] * d, kv[1] * d)
    i = slice(*inter)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _linear(attn.q_proj.weight[q], attn.q_proj.bias[q])
        attn.k_proj = _linear(attn.k_proj.weight[k], attn.k_proj.bias[k])
        attn.v_proj = _linear(attn.v_proj.weight[k], attn.v_proj.bias[k])
        attn.o_proj = _linear(attn.o_proj.weight[:, q], attn.o_proj.bias)
        mlp.gate_proj = _linear(mlp.gate_proj.weight[i], mlp.gate_proj.bias[i])
        mlp.up_proj = _linear(mlp.up_proj.weight[i], mlp.up_proj.bias[i])
        mlp.down_proj = _linear(mlp.down_proj.weight[:, i], mlp.down_proj.bias)
    model.lm_head = _RowSplitHead(hf.lm_head.weight.detach(), *hidden)
    return model


def test_tensor_parallel_uneven_split_matches_unsharded() -> None:
    """Catches head counts read from the config instead of the weights, a missing reduction, or a
    row-parallel bias added on every rank: two ranks holding 2 and 1 of 3 KV-head groups (with
    biases everywhere) reproduce the unsharded model's logits and greedy tokens."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**_DECODER, "hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 3,
                            "attention_bias": True, "mlp_bias": True})
    hf = LlamaForCausalLM(config).eval()
    ids, mask = _prompts()
    with torch.no_grad():
        expected_logits = hf(ids, attention_mask=mask).logits
    expected_tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    splits = [((0, 2), (0, 96), (0, 64)), ((2, 3), (96, 128), (64, 96))]
    comm = _ThreadSum(2)
    ranks = [build_fast_model(_shard_llama(hf, *s), MAX_OUT, reduce=comm.reducer(r)) for r, s in enumerate(splits)]
    assert [m.blocks[0].attn.heads for m in ranks] == [4, 2]

    def run(model: FastCausalLM) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(ids, attention_mask=mask, use_cache=False).logits
        return logits, model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, ranks))
    for logits, tokens in results:
        # 1e-5: the sharded sums regroup fp32 additions (partial matmuls then one add).
        torch.testing.assert_close(logits[mask.bool()], expected_logits[mask.bool()], rtol=0, atol=1e-5)
        assert torch.equal(tokens, expected_tokens)
