"""DeepSpeed-Chat's LoRA helpers and EMA update, without processes.

Catches: a LoRA layer whose output differs from W x + b + s x R L, fusion that writes into the trained weight
(DeepSpeed-Chat's += / -= drifts it in 16-bit), a merged export that loses the adapter or keeps LoRA keys, the
wrong parameters left trainable, and an EMA with beta on the wrong side.
"""
from __future__ import annotations

import torch
from torch import nn

from shardspeed.chat.lora import (LinearLayer_LoRA, convert_linear_layer_to_lora, convert_lora_to_linear_layer,
                                  only_optimize_lora_parameters)
from shardspeed.chat.utils import moving_average


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 3)).to(dtype)


def _with_lora(dtype: torch.dtype = torch.float32) -> nn.Module:
    model = convert_linear_layer_to_lora(_model(dtype), "1.", lora_dim=4, lora_scaling=2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LinearLayer_LoRA):
                module.lora_left_weight.normal_()  # DeepSpeed-Chat starts it at zero; make the adapter matter
    return model


def test_lora_layer_maths_and_conversion() -> None:
    plain, model = _model(), _with_lora()
    lora = model[1][0]
    assert isinstance(lora, LinearLayer_LoRA) and isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    x = torch.randn(5, 6)
    h = plain[0](x)
    expected = h @ lora.weight.T + lora.bias + (h @ lora.lora_right_weight @ lora.lora_left_weight) * (2 / 4)
    torch.testing.assert_close(lora(h), expected)
    assert not lora.weight.requires_grad and lora.lora_left_weight.requires_grad
    before = model(x)
    merged = convert_lora_to_linear_layer(model)
    assert isinstance(merged[1][0], nn.Linear) and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-6)  # x(W + sLR)^T vs xW^T + s xRL: rounding


def test_fusing_never_moves_the_trained_weight() -> None:
    model = _with_lora(torch.bfloat16)
    lora = model[1][0]
    weight = lora.weight.detach().clone()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    for _ in range(5):
        lora.fuse_lora_weight()
        fused = lora(x)
        lora.unfuse_lora_weight()
    assert torch.equal(lora.weight, weight)
    # bf16: the fused product rounds once, the two-path sum twice (8-bit mantissa)
    torch.testing.assert_close(fused, lora(x), rtol=3e-2, atol=3e-2)


def test_only_optimize_lora_parameters() -> None:
    model = only_optimize_lora_parameters(_with_lora(), force_optimize_params=["2.weight"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"1.0.lora_right_weight", "1.0.lora_left_weight", "2.weight"}


def _tied() -> nn.Module:
    model = _model()
    model[2].weight = nn.Parameter(torch.randn(3, 8))
    model.add_module("head", nn.Linear(8, 3, bias=False))
    model.head.weight = model[2].weight  # tied, as embeddings and LM head are
    return model


def test_moving_average_is_deepspeed_chats_lerp() -> None:
    """Catches beta on the wrong side and a tied weight updated twice."""
    actor, ema = _tied(), _tied()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in ema.parameters()]
    moving_average(actor, ema)
    for theta, old, new in zip(actor.parameters(), before, ema.parameters()):
        torch.testing.assert_close(new, 0.992 * old + 0.008 * theta)
