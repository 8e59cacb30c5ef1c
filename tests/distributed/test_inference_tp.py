"""`init_inference` with tensor parallelism over gloo: TP=2 equals the unsharded model (logits, greedy
tokens), for Llama (even and uneven key/value-head splits), Qwen2, Mistral, Mixtral (experts split, router
whole), GPT-2 (which DeepSpeed refuses) and an injection policy; sampling draws the same tokens on every
tensor-parallel rank; world 4 = 2 replicas of TP 2, each serving its own prompts; bad set-ups fail clearly.
"""
from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardspeed
from tests.harness import run_distributed

pytestmark = pytest.mark.hf


def _model(kind: str) -> Any:
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, max_position_embeddings=128)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "llama_uneven":  # 3 key/value heads over 2 ranks: 2 and 1
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_attention_heads=6, num_key_value_heads=3, head_dim=8, **common))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common))
    if kind == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common))
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                       num_experts_per_tok=2, **common))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=128))
    raise ValueError(kind)


def _prompts(replica: int) -> torch.Tensor:
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(10 + replica))


def _compare(kind: str, policy: bool = False, dtype: torch.dtype = torch.float32, inject: bool = False) -> dict[str, Any]:
    world = dist.get_world_size()
    replica = dist.get_rank() // 2
    reference = _model(kind).eval()
    model = _model(kind)
    kwargs: dict[str, Any] = {}
    if policy:
        layer = type(model.model.layers[0])
        kwargs["injection_policy"] = {layer: ("self_attn.o_proj", "mlp.down_proj")}
    engine = shardspeed.init_inference(model, dtype=dtype, tensor_parallel={"tp_size": 2}, replace_with_kernel_inject=inject,
                                       max_out_tokens=64, **kwargs)
    ids = _prompts(replica if world > 2 else 0)
    with torch.no_grad():
        logits = engine(ids).logits.float()
        expected = reference.to(dtype)(ids).logits.float()
        tokens = engine.generate(ids, max_new_tokens=32, do_sample=False)
        expected_tokens = reference.generate(ids, max_new_tokens=32, do_sample=False)
    recorded = engine(ids).logits.detach().float()  # autograd on, as a caller without no_grad has it
    sharded = any(p.shape != q.shape for p, q in zip(model.parameters(), reference.parameters()))
    if inject:
        assert type(engine.module).__name__ == "FastCausalLM"
    shm = engine._shm is not None and engine._shm.active  # decode's all-reduces through shared memory (x86-64 hosts)
    return {"logits": max((logits - expected).abs().max().item(), (recorded - expected).abs().max().item()),
            "same_tokens": torch.equal(tokens, expected_tokens),
            "sharded": sharded, "shm": shm}


@pytest.mark.parametrize("kind", ["llama", "llama_uneven", "qwen2", "mistral", "mixtral", "gpt2"])
def test_tp2_equals_the_unsharded_model(tmp_path: Path, kind: str) -> None:
    for result in run_distributed(_compare, 2, tmp_path, kind, deadline=180):
        assert result["sharded"]
        assert result["shm"] == (platform.machine() in ("x86_64", "AMD64")), result
        assert result["logits"] < 1e-5, result
        assert result["same_tokens"], result


def test_injection_policy_names_the_row_parallel_linears(tmp_path: Path) -> None:
    for result in run_distributed(_compare, 2, tmp_path, "llama", True, deadline=180):
        assert result["sharded"] and result["logits"] < 1e-5 and result["same_tokens"], result


@pytest.mark.parametrize("kind", ["llama_uneven", "gpt2"])
def test_fast_path_with_tp2_equals_the_unsharded_model(tmp_path: Path, kind: str) -> None:
    """replace_with_kernel_inject with tensor parallelism, and with an injection policy (the guide's §10.2,
    which DeepSpeed refuses)."""
    for result in run_distributed(_compare, 2, tmp_path, kind, False, torch.float32, True, deadline=180):
        assert result["sharded"] and result["logits"] < 1e-5 and result["same_tokens"], result
    for result in run_distributed(_compare, 2, tmp_path / "policy", "llama", True, torch.float32, True, deadline=180):
        assert result["sharded"] and result["logits"] < 1e-5 and result["same_tokens"], result


def test_bf16_close_to_fp32_reference(tmp_path: Path) -> None:
    for result in run_distributed(_compare, 2, tmp_path, "llama", False, torch.bfloat16, deadline=180):
        assert result["logits"] < 2e-2 * 10, result  # bf16 logits of a random model span about +-1


def test_two_replicas_of_tp2_serve_their_own_prompts(tmp_path: Path) -> None:
    for result in run_distributed(_compare, 4, tmp_path, "llama", deadline=240):
        assert result["logits"] < 1e-5 and result["same_tokens"], result
        assert result["shm"] == (platform.machine() in ("x86_64", "AMD64")), result  # one mapping per replica


def _sample() -> list[int]:
    torch.manual_seed(100 + dist.get_rank())  # different on purpose: the engine shares rank 0's state
    engine = shardspeed.init_inference(_model("llama"), dtype=torch.float32, tensor_parallel={"tp_size": 2})
    with torch.no_grad():
        out = engine.generate(_prompts(0), max_new_tokens=24, do_sample=True, temperature=1.5, top_k=0)
    return out.reshape(-1).tolist()


def test_sampling_draws_the_same_tokens_on_every_tp_rank(tmp_path: Path) -> None:
    first, second = run_distributed(_sample, 2, tmp_path, deadline=120)
    assert first == second


def _bad(case: str) -> str:
    model = _model("llama")
    try:
        if case == "tp_larger_than_kv_heads":
            import transformers as tf

            one_kv = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=1,
                                                        num_attention_heads=4, num_key_value_heads=1))
            shardspeed.init_inference(one_kv, tensor_parallel={"tp_size": 2}, dtype=torch.float32)
        elif case == "tp_larger_than_world":
            shardspeed.init_inference(model, tensor_parallel={"tp_size": 4}, dtype=torch.float32)
        elif case == "bad_policy_name":
            shardspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float32,
                                      injection_policy={type(model.model.layers[0]): ("self_attn.out_proj",)})
        elif case == "cuda_graph_with_tp":
            shardspeed.init_inference(model, tensor_parallel={"tp_size": 2}, enable_cuda_graph=True)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.parametrize("case,expected", [
    ("tp_larger_than_kv_heads", "larger than the model's 1 key/value heads"),
    ("tp_larger_than_world", "`tensor_parallel.tp_size` 4 must divide the world size 2"),
    ("bad_policy_name", "Injection policy layer'self_attn.out_proj' not valid."),
    ("cuda_graph_with_tp", "Cuda graph is not supported for model parallelism"),
])
def test_bad_tensor_parallel_setups_name_the_problem(tmp_path: Path, case: str, expected: str) -> None:
    for message in run_distributed(_bad, 2, tmp_path, case, deadline=120):
        assert expected in message, message
