"""The FLOPs profiler: exact counts for Hugging Face GPT-2 and Llama built from configs, a module tree
whose children sum to their parent, DeepSpeed's return values and number formats.

Counts do not depend on the weights, so the models are random; the analytic counts below follow the
conventions of docs/observability.md (2 FLOPs per multiply-accumulate, bias additions not counted,
attention's two products over the full square, LayerNorm 5 and RMSNorm 4 per element, softmax and
activations 1 per element, elementwise arithmetic 0).
"""
from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shardspeed.profiling.flops_profiler import (FlopsProfiler, duration_to_string, flops_to_string, get_model_profile,
                                                 macs_to_string, number_to_string, params_to_string)

transformers = pytest.importorskip("transformers")

B, S = 2, 16  # batch, sequence
T = B * S  # tokens


def _gpt2(**overrides: object) -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="sdpa", **overrides)
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(cfg)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(0))


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _gpt2_analytic(layers: int = 2, d: int = 64, vocab: int = 128, gelu_per_element: int = 0) -> tuple[int, int]:
    """(FLOPs, MACs) of a GPT-2 forward: per layer qkv (d x 3d), attention output (d x d), MLP (d x 4d, 4d x d);
    attention's two products (B x S x S x d each); two LayerNorms per layer and a final one; the tied LM head."""
    linear_macs = layers * T * (3 * d * d + d * d + 4 * d * d + 4 * d * d) + T * d * vocab
    attention_macs = layers * 2 * B * S * S * d
    macs = linear_macs + attention_macs
    layer_norms = 5 * T * d * (2 * layers + 1)
    activations = gelu_per_element * layers * T * 4 * d
    return 2 * macs + layer_norms + activations, macs


def _llama_analytic(layers: int = 2, d: int = 64, inner: int = 96, heads: int = 4, kv_heads: int = 2,
                    vocab: int = 128) -> tuple[int, int]:
    """(FLOPs, MACs) of a Llama forward: q/o (d x d), k/v (d x kv_heads*head_dim), gate/up/down (d x inner);
    attention over all query heads (grouped keys broadcast); SiLU on the gate; two RMSNorms per layer and a final one."""
    head_dim = d // heads
    linear_macs = layers * T * (2 * d * d + 2 * d * kv_heads * head_dim + 3 * d * inner) + T * d * vocab
    attention_macs = layers * 2 * B * heads * S * S * head_dim
    macs = linear_macs + attention_macs
    silu = layers * T * inner
    rms_norms = 4 * T * d * (2 * layers + 1)
    return 2 * macs + silu + rms_norms, macs


def test_gpt2_counts_equal_the_analytic_count() -> None:
    """Catches a linear or attention product missed or counted twice, a LayerNorm miscounted, or
    GPT-2's Conv1D (torch.addmm) not seen."""
    model = _gpt2()
    flops, macs, params = get_model_profile(model, args=[_ids()], print_profile=False, as_string=False)
    assert (flops, macs) == _gpt2_analytic()
    assert params == _params(model)  # the tied LM head once


def test_gpt2_with_a_gelu_kernel_counts_one_flop_per_element() -> None:
    """Catches an activation that runs as one kernel (F.gelu) not being counted."""
    flops, _, _ = get_model_profile(_gpt2(activation_function="gelu_pytorch_tanh"), args=[_ids()], print_profile=False,
                                    as_string=False)
    assert flops == _gpt2_analytic(gelu_per_element=1)[0]


def test_llama_counts_equal_the_analytic_count() -> None:
    """Catches grouped-query attention counted over the key heads, SiLU or RMSNorm (Hugging Face's
    hand-written LlamaRMSNorm) missed, or the rotary embedding's arithmetic counted."""
    model = _llama()
    flops, macs, params = get_model_profile(model, args=[_ids()], print_profile=False, as_string=False)
    assert (flops, macs) == _llama_analytic()
    assert params == _params(model)


def test_counts_against_deepspeed_differ_only_where_documented() -> None:
    """DeepSpeed 0.19.8's get_model_profile on these two models, same inputs (as_string=False), gave:
    GPT-2 (7130240, 3538944, 112384) and Llama (4724736, 2359296, 78144). MACs and parameters are equal;
    the FLOPs differ only by what docs/observability.md lists: DeepSpeed adds each Conv1D's bias once
    per call (GPT-2: 2 layers x (3d + d + 4d + d) = 1152) and counts no RMSNorm (Llama: 5 norms x 4 x T x d)."""
    gpt2 = get_model_profile(_gpt2(), args=[_ids()], print_profile=False, as_string=False)
    assert gpt2 == (7130240 - 2 * 9 * 64, 3538944, 112384)
    llama = get_model_profile(_llama(), args=[_ids()], print_profile=False, as_string=False)
    assert llama == (4724736 + 5 * 4 * T * 64, 2359296, 78144)


def test_counts_equal_deepspeeds_where_it_is_right() -> None:
    """DeepSpeed 0.19.8 on the same inputs: linear + LayerNorm + GELU (4416, 1920, 740), equal; the small
    CNN of test_convolution_pooling_and_input_shape (63488, 30208, 1514), which adds the convolution's
    bias (8 channels x 2 x 8 x 8 outputs = 1024) where shardspeed counts no bias additions."""
    mlp = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 4))
    assert get_model_profile(mlp, args=[torch.randn(3, 16)], print_profile=False, as_string=False) == (4416, 1920, 740)
    assert get_model_profile(_cnn(), input_shape=(2, 3, 8, 8), print_profile=False, as_string=False) == (63488 - 1024, 30208, 1514)


def test_tree_children_sum_to_their_parent_and_print() -> None:
    """Catches a module's own ops (attention in the attention block) lost from the tree, or a printed
    line that disagrees with the numbers."""
    model = _gpt2()
    prof = FlopsProfiler(model)
    prof.start_profile()
    model(_ids())
    prof.stop_profile()
    root = prof.profile()
    assert root.flops == prof.get_total_flops() == _gpt2_analytic()[0]
    for node, _ in root.walk():
        if node.children:
            assert node.flops == sum(c.flops for c in node.children) + node.own_flops, node.name
            assert node.macs == sum(c.macs for c in node.children) + node.own_macs, node.name
    attn = next(node for node, _ in root.walk() if node.kind == "GPT2Attention")  # transformer.h.0.attn
    assert attn.kind == "GPT2Attention" and attn.own_macs == 2 * B * S * S * 64
    out = io.StringIO()
    with redirect_stdout(out):
        prof.print_model_profile(profile_step=3, top_modules=2)
    text = out.getvalue()
    prof.end_profile()
    assert "Profile Summary at step 3:" in text
    assert "{:<70}  {}".format("fwd MACs per GPU: ", macs_to_string(root.macs)) in text
    assert text.count("(own ops): ") == 2  # the two attention blocks; GPT-2's other modules run no counted op of their own
    assert f"(attn): GPT2Attention(\n          {params_to_string(attn.params)} = " in text
    assert f"{number_to_string(attn.flops)}FLOPs" in text
    assert text.splitlines()[-1] == "-" * 78
    for depth in range(5):  # every depth of the aggregated profile, the innermost (Conv1D, Dropout) included
        assert f"depth {depth}:" in text
    assert "'Conv1D'" in text


def test_get_model_profile_strings_and_modes(tmp_path) -> None:
    """Catches DeepSpeed's string formats drifting, the output file not written, or the model left in eval mode."""
    model = _gpt2()
    model.train()
    out = tmp_path / "profile" / "flops.txt"
    flops, macs, params = get_model_profile(model, args=[_ids()], detailed=False, output_file=str(out))
    assert (flops, macs, params) == ("7.13 M", "3.54 MMACs", "112.38 K")
    assert model.training
    assert "Aggregated Profile per GPU" in out.read_text() and "Detailed Profile" not in out.read_text()
    assert number_to_string(0) == "0 " and number_to_string(1234) == "1.23 K" and number_to_string(5e-4) == "500 u"
    assert params_to_string(1.5e9) == "1.5 B" and params_to_string(7) == "7"
    assert flops_to_string(2.5e12) == "2.5 TFLOPS" and duration_to_string(0.24617) == "246.17 ms"
    with pytest.raises(ValueError, match="input_shape, args or kwargs"):
        get_model_profile(model)


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def test_convolution_pooling_and_input_shape() -> None:
    """Catches convolutions counted with their bias (DeepSpeed does) or pooling missed; input_shape
    builds an input of the model's dtype."""
    flops, macs, _ = get_model_profile(_cnn(), input_shape=(2, 3, 8, 8), print_profile=False, as_string=False)
    conv_macs = 2 * 8 * 8 * 8 * 3 * 3 * 3  # batch x output pixels x out channels x in channels x kernel
    linear_macs = 2 * 128 * 10
    assert macs == conv_macs + linear_macs
    relu, pool = 2 * 8 * 8 * 8, 2 * 8 * 8 * 8  # one per element of their input
    assert flops == 2 * macs + relu + pool


class _Attention(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=True)


def test_attention_counts_the_same_whichever_kernel_runs() -> None:
    """Catches the math fallback (taken with dropout) counted differently from the fused CPU kernel:
    its softmax and scaling are inside attention and are not counted again."""
    q, k, v = (torch.randn(2, 4, 8, 16) for _ in range(3))
    counts = []
    for dropout in (0.0, 0.5):
        model = _Attention(dropout).train()
        prof = FlopsProfiler(model)
        prof.start_profile()
        model(q, k, v)
        counts.append((prof.get_total_flops(), prof.get_total_macs()))
        prof.end_profile()
    assert counts[0] == counts[1] == (4 * 2 * 4 * 8 * 8 * 16, 2 * 2 * 4 * 8 * 8 * 16)


class _Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsd,de->bse", x, self.w).softmax(-1)


def test_einsum_and_softmax_method_are_counted() -> None:
    """Catches ops DeepSpeed's patching misses: einsum's MACs and `Tensor.softmax`."""
    flops, macs, _ = get_model_profile(_Einsum(), args=[torch.randn(2, 5, 16)], print_profile=False, as_string=False)
    assert macs == 2 * 5 * 16 * 8 and flops == 2 * macs + 2 * 5 * 8


def test_ignored_modules_and_repeated_profiles() -> None:
    """Catches ignore_list not excluding a module's work, or a second profile adding to the first."""
    model = _gpt2()
    prof = FlopsProfiler(model)
    prof.start_profile(ignore_list=[transformers.pytorch_utils.Conv1D])
    model(_ids())
    prof.stop_profile()
    linear_and_norm = _gpt2_analytic()[0] - 2 * 2 * T * 12 * 64 * 64
    assert prof.get_total_flops() == linear_and_norm
    prof.end_profile()
    prof.start_profile()
    model(_ids())
    assert prof.get_total_flops() == _gpt2_analytic()[0]
    prof.end_profile()
    with pytest.raises(RuntimeError, match="nothing profiled"):
        prof.get_total_flops()
