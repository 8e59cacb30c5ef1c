"""ZeRO-3 with Hugging Face's default (non-reentrant) activation checkpointing: the recompute runs inside
backward, and the weights it gathers must stay gathered until their gradients are in. Training equals
training without checkpointing, at world 1 and 2 (it failed with "size of tensor a (0)" before)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import shardspeed
from tests.harness import run_distributed

pytestmark = pytest.mark.hf


def _train(checkpointing: bool, reentrant: bool) -> list[float]:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                               num_attention_heads=4, num_key_value_heads=2))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0,
                              "stage3_max_live_parameters": 0}})
    engine.train()
    losses = []
    for step in range(3):
        ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(10 * step + dist.get_rank()))
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    engine.destroy()
    return losses


def _compare() -> dict[str, float]:
    plain = _train(False, False)
    return {mode: max(abs(a - b) for a, b in zip(plain, _train(True, mode == "reentrant")))
            for mode in ("non_reentrant", "reentrant")}


@pytest.mark.parametrize("world", [1, 2])
def test_stage3_with_hf_gradient_checkpointing_equals_without(tmp_path: Path, world: int) -> None:
    for diffs in run_distributed(_compare, world, tmp_path, deadline=180):
        assert diffs["non_reentrant"] < 1e-6 and diffs["reentrant"] < 1e-6, diffs
