"""Hugging Face MoE models (transformers 5's fused experts) trained with the `expert_parallel` section
(DeepSpeed's AutoEP): each rank keeps half the experts, tokens travel by all-to-all, and training equals
plain data parallelism (every rank holding every expert) step for step; a checkpoint saved with experts
split over 2 ranks loads into 1 rank holding all of them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardspeed
from tests.harness import run_distributed

pytestmark = pytest.mark.hf
STEPS = 3


def _model(kind: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.02)
    if kind == "mixtral":
        config = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
        model = transformers.MixtralForCausalLM(config)
    else:
        config = transformers.Qwen3MoeConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                             decoder_sparse_step=1, mlp_only_layers=[], head_dim=8, **common)
        model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # random experts (the default init leaves them alike in scale only)
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.2)
    return model


def _batch(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(100 * step + rank))


def _config(stage: int, ep: int, gas: int = 1) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "gradient_clipping": 0.5,
                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
                           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    if ep > 1:
        cfg["expert_parallel"] = {"enabled": True, "autoep_size": ep}
    return cfg


def _whole(engine: Any) -> dict[str, torch.Tensor]:
    """Every weight whole (fused experts joined over ranks), from a checkpoint-style collection."""
    from shardspeed.runtime.expert_states import with_all_experts

    state = engine.module_state_dict()
    if engine.zero_optimization_stage() == 3:
        state = engine.strategy.consolidated_state_dict(on_all_ranks=True)
    return {k: v.detach().float().clone() for k, v in with_all_experts(engine.module, state).items()}


def _train(kind: str, stage: int, ep: int) -> tuple[list[float], dict[str, torch.Tensor], int]:
    model = _model(kind)
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage, ep))
    losses = []
    for step in range(STEPS):
        ids = _batch(step, dist.get_rank())
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    fused = next(p for n, p in engine.module.named_parameters() if "gate_up_proj" in n)
    local_experts = int(getattr(fused, "ds_shape", fused.shape)[0])
    weights = _whole(engine)
    engine.destroy()
    return losses, weights, local_experts


def _compare(kind: str, stage: int) -> dict[str, float]:
    ref_losses, ref, ref_local = _train(kind, stage, 1)
    losses, got, local = _train(kind, stage, 2)
    assert (ref_local, local) == (4, 2), (ref_local, local)
    assert sorted(ref) == sorted(got)
    initial = _model(kind).state_dict()
    return {"loss": max(abs(a - b) for a, b in zip(ref_losses, losses)),
            "weights": max((ref[k] - got[k]).abs().max().item() for k in ref),
            "moved": max((ref[k] - initial[k].float()).abs().max().item() for k in ref if "experts" in k)}


@pytest.mark.parametrize("kind,stage", [("mixtral", 0), ("mixtral", 2), ("mixtral", 3), ("qwen3_moe", 1)])
def test_expert_parallel_equals_data_parallel(tmp_path: Path, kind: str, stage: int) -> None:
    for diff in run_distributed(_compare, 2, tmp_path, kind, stage, deadline=240):
        assert diff["loss"] < 1e-5 and diff["weights"] < 1e-5, diff
        assert diff["moved"] > 1e-3, diff


def _save(save_dir: str) -> list[float]:
    model = _model("mixtral")
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(2, 2))
    losses = []
    for step in range(4):
        if step == 2:
            engine.save_checkpoint(save_dir, tag="mid")
        ids = _batch(step, dist.get_rank())
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, losses[2:])
    engine.destroy()
    return [everyone[r][s] for s in range(2) for r in range(2)]


def _load(save_dir: str) -> list[float]:
    torch.manual_seed(5)
    model = _model("mixtral")
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(2, 1, gas=2))
    engine.load_checkpoint(save_dir, tag="mid")
    losses = []
    for step in range(2, 4):
        for rank in range(2):  # the two ranks' batches as two micro steps
            ids = _batch(step, rank)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    engine.destroy()
    return losses


def test_checkpoint_with_split_experts_loads_on_one_rank(tmp_path: Path) -> None:
    uninterrupted = run_distributed(_save, 2, tmp_path / "run", str(tmp_path / "ckpt"), deadline=180)[0]
    resumed = run_distributed(_load, 1, tmp_path / "load", str(tmp_path / "ckpt"), deadline=180)[0]
    assert max(abs(a - b) for a, b in zip(uninterrupted, resumed)) < 1e-5, (uninterrupted, resumed)
    saved = torch.load(tmp_path / "ckpt" / "mid" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert saved["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # whole, as transformers names it
