"""`init_inference` in one process: DeepSpeed 0.19.8's inference config (fields, aliases, defaults,
deprecated keys, the config/kwargs merge) and the engine's own behaviour (forward, generate only when the
module has one, the max_out_tokens check, beams, timing), with the errors DeepSpeed users know."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import shardspeed
from shardspeed.config import ConfigError
from shardspeed.inference.config import DeepSpeedInferenceConfig, parse_inference_config


def _llama() -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def test_defaults_are_deepspeeds() -> None:
    c = DeepSpeedInferenceConfig()
    assert c.dtype == torch.float16 and c.max_out_tokens == 1024 and c.min_out_tokens == 1
    assert c.tensor_parallel.tp_size == 1 and c.tensor_parallel.tp_grain_size == 64 and c.tensor_parallel.enabled
    assert not c.replace_with_kernel_inject and not c.enable_cuda_graph and c.return_tuple and c.triangular_masking
    assert c.replace_method == "auto" and c.injection_policy is None and c.checkpoint is None
    assert shardspeed.default_inference_config()["max_out_tokens"] == 1024


@pytest.mark.parametrize("written,field,value", [
    ({"kernel_inject": True}, "replace_with_kernel_inject", True),
    ({"tp": {"tp_size": 2}}, "tensor_parallel.tp_size", 2),
    ({"max_tokens": 7}, "max_out_tokens", 7),
    ({"min_tokens": 3}, "min_out_tokens", 3),
    ({"dtype": "bf16"}, "dtype", torch.bfloat16),
    ({"dtype": "half"}, "dtype", torch.float16),
    ({"dtype": "torch.float32"}, "dtype", torch.float32),
    ({"dtype": torch.bfloat16}, "dtype", torch.bfloat16),
    ({"mp_size": 2}, "tensor_parallel.tp_size", 2),  # deprecated, moved
    ({"ep_size": 2}, "moe.ep_size", 2),
    ({"moe": False}, "moe.enabled", False),
    ({"tm": False}, "triangular_masking", False),
])
def test_aliases_and_deprecated_keys(written: dict, field: str, value: object) -> None:
    c = parse_inference_config(written)
    target: object = c
    for part in field.split("."):
        target = getattr(target, part)
    assert target == value


@pytest.mark.parametrize("config,kwargs,message", [
    ({"dtype": torch.float32}, {"dtype": torch.bfloat16}, "Conflicting argument 'dtype' in 'config':torch.float32 and kwargs:torch.bfloat16"),
    ({"max_out_tokns": 3}, {}, "did you mean `max_out_tokens`"),
    ({"tensor_parallel": {"tp_sise": 2}}, {}, "did you mean `tensor_parallel.tp_size`"),
    ({"dtype": "fp33"}, {}, "'fp33' is not a valid dtype"),
    ({"mp_size": 2, "tensor_parallel": {"tp_size": 2}}, {}, "Cannot provide deprecated parameter 'mp_size'"),
    (3, {}, "'config' argument expected string or dictionary, got <class 'int'>"),
])
def test_bad_configs_name_the_problem(config: object, kwargs: dict, message: str) -> None:
    with pytest.raises((ConfigError, ValueError, TypeError)) as info:
        parse_inference_config(config, **kwargs)
    assert message in str(info.value)


def test_config_from_a_json_file_merged_with_kwargs(tmp_path: Path) -> None:
    path = tmp_path / "inference.json"
    path.write_text(json.dumps({"dtype": "fp32", "max_out_tokens": 40}))
    c = parse_inference_config(str(path), replace_with_kernel_inject=False, max_out_tokens=40)
    assert c.dtype == torch.float32 and c.max_out_tokens == 40


def test_engine_forward_and_generate_equal_the_model() -> None:
    reference = _llama().eval()
    engine = shardspeed.init_inference(_llama(), dtype=torch.float32, max_out_tokens=64)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(engine(ids).logits, reference(ids).logits)
        assert torch.equal(engine.generate(ids, max_new_tokens=10, do_sample=False),
                           reference.generate(ids, max_new_tokens=10, do_sample=False))
        # DeepSpeed refuses num_beams > 1; the module's own beam search runs here
        beams = engine.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False)
        assert torch.equal(beams, reference.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False))


def test_input_longer_than_max_out_tokens_is_deepspeeds_error() -> None:
    engine = shardspeed.init_inference(_llama(), dtype=torch.float32, max_out_tokens=5)
    with pytest.raises(RuntimeError, match="Input with size 10 exceeds maximum length of 5. Please increase max_tokens"):
        engine.generate(torch.zeros(1, 10, dtype=torch.long), max_new_tokens=2)


def test_dtype_cast_and_no_generate_without_one() -> None:
    engine = shardspeed.init_inference(nn.Sequential(nn.Linear(4, 4)), dtype="bf16")
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert not hasattr(engine, "generate")
    engine.profile_model_time()
    engine(torch.ones(2, 4, dtype=torch.bfloat16))
    assert len(engine.model_times()) == 1 and engine.model_times() == []


@pytest.mark.parametrize("kwargs,message", [
    ({"dtype": torch.int8}, "int8 / quantized inference"),
    ({"moe": {"ep_size": 2}}, "expert-parallel inference is not supported yet"),
    ({"zero": {"stage": 2}}, "ZeRO-Inference partitions parameters, which is stage 3"),
])
def test_unbuilt_options_are_refused_clearly(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        shardspeed.init_inference(_llama(), **kwargs)
