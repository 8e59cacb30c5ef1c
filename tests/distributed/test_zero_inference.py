"""ZeRO-Inference: a stage-3 model with no optimizer, parameters partitioned (offload none / cpu / nvme),
gives logits bit-identical to the unsharded model and the same greedy tokens, at world 1 and 2; ranks with
different prompts, one of which stops early at end-of-sequence, finish without hanging (shardspeed makes
`synced_gpus` the default; DeepSpeed's ranks crash). Reached both through `initialize` (DeepSpeed's
documented way) and through `init_inference(config={"zero": ...})` (the guide's §10.3).
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


def _model() -> Any:
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                              eos_token_id=5, pad_token_id=0))


def _zero(offload: str, nvme: str) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload != "none":
        zero["offload_param"] = {"device": offload, "nvme_path": nvme, "pin_memory": False, "buffer_count": 8,
                                 "buffer_size": 100_000}
    return zero


def _run(offload: str, nvme: str, via: str) -> dict[str, Any]:
    rank = dist.get_rank()
    reference = _model().eval()
    model = _model()
    if via == "initialize":
        engine, optimizer, _, _ = shardspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                                                             "zero_optimization": _zero(offload, nvme)})
        module = engine.module
        generate = module.generate
    else:
        engine = shardspeed.init_inference(model, config={"dtype": torch.float32, "zero": _zero(offload, nvme)})
        module = engine.module
        generate = engine.generate
    partitioned = all(p.numel() == 0 or hasattr(p, "ds_numel") for p in module.parameters())
    # Different prompt lengths per rank; rank 1 is made to stop at once by its eos.
    ids = torch.randint(6, 96, (1, 5 + 3 * rank), generator=torch.Generator().manual_seed(rank))
    module.eval()
    with torch.no_grad():
        logits = module(ids).logits
        expected = reference(ids).logits
        eos = None
        if rank == 1:
            eos = int(reference(ids).logits[0, -1].argmax())  # the first generated token ends the sequence
        tokens = generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos if eos is not None else 5,
                          pad_token_id=0)
        expected_tokens = reference.generate(ids, max_new_tokens=12, do_sample=False,
                                             eos_token_id=eos if eos is not None else 5, pad_token_id=0)
    return {"partitioned": partitioned, "bitwise": torch.equal(logits, expected),
            "tokens": torch.equal(tokens, expected_tokens), "stopped_early": rank == 1 and tokens.shape[1] < ids.shape[1] + 12}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("offload", ["none", "cpu", "nvme"])
def test_zero_inference_matches_the_unsharded_model(tmp_path: Path, world: int, offload: str) -> None:
    results = run_distributed(_run, world, tmp_path, offload, str(tmp_path / "nvme"), "initialize", deadline=180)
    for r in results:
        assert r["partitioned"] and r["bitwise"] and r["tokens"], r
    if world == 2:
        assert results[1]["stopped_early"], results


def test_init_inference_zero_section_partitions_the_model(tmp_path: Path) -> None:
    for r in run_distributed(_run, 2, tmp_path, "cpu", str(tmp_path / "nvme"), "init_inference", deadline=180):
        assert r["partitioned"] and r["bitwise"] and r["tokens"], r


def _swap_buffers_as_weights(nvme: str) -> dict[str, Any]:
    reference = _model().eval()
    model = _model()
    zero = _zero("nvme", nvme)
    zero["offload_param"]["buffer_count"] = 2  # fewer than the units a forward uses at once: some reads overflow the pool
    zero["stage3_max_reuse_distance"] = 0
    engine, *_ = shardspeed.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero})
    manager = engine.strategy.manager
    pool = {b.data_ptr() for b in manager.param_swapper.buffers}
    seen: dict[str, list[bool]] = {"no_grad": [], "all_gathered": [], "held_then_grad": [], "grad": []}
    phase = ["no_grad"]

    def record(mod: torch.nn.Module, args: Any) -> None:
        seen[phase[0]].append(mod.weight.data_ptr() in pool)

    hooks = [m.register_forward_pre_hook(record) for m in engine.module.modules() if "weight" in m._parameters]
    ids = torch.randint(6, 96, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = engine.module(ids).logits
        tokens = engine.module.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        expected_tokens = reference.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        phase[0] = "all_gathered"  # every unit at once: two in the pool's buffers, the rest in buffers of their own
        with shardspeed.zero.GatheredParameters(list(engine.module.parameters())):
            all_gathered = engine.module(ids).logits
            phase[0] = "held_then_grad"  # gathered into swap buffers, then used with autograd on: copies
            with torch.enable_grad():
                held_then_grad = engine.module(ids).logits
    phase[0] = "grad"
    with_grad = engine.module(ids).logits  # autograd records: gathered weights are copies, not pool buffers
    expected = reference(ids).logits
    for h in hooks:
        h.remove()
    engine.destroy()
    return {"bitwise": all(torch.equal(x.detach(), expected.detach()) for x in (logits, all_gathered, held_then_grad, with_grad)),
            "tokens": torch.equal(tokens, expected_tokens), "seen": seen}


def test_nvme_generation_at_world_one_reads_weights_in_place(tmp_path: Path) -> None:
    """One rank, under no_grad: a unit's weights are the swap buffer its shards were read into (no copy),
    and gathering more units than the pool holds still works; with autograd on, the weights are copies."""
    r = run_distributed(_swap_buffers_as_weights, 1, tmp_path, str(tmp_path / "nvme"), deadline=180)[0]
    assert r["bitwise"] and r["tokens"], r
    assert r["seen"]["no_grad"] and all(r["seen"]["no_grad"]), r["seen"]
    assert sum(r["seen"]["all_gathered"]) == 2 and len(r["seen"]["all_gathered"]) > 2, r["seen"]
    assert r["seen"]["grad"] and not any(r["seen"]["grad"]), r["seen"]
    assert r["seen"]["held_then_grad"] and not any(r["seen"]["held_then_grad"]), r["seen"]
