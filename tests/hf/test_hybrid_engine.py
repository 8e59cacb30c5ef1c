"""The hybrid engine (`hybrid_engine.enabled`): generation at ZeRO 0, 2 and 3 (pinned and unpinned) gives
the unsharded model's tokens, greedy and sampled; pinned generation runs no collective while decoding (the
count does not grow with max_new_tokens); ranks that stop at different steps finish; training between
generations works and leaves frozen (LoRA base) weights bitwise unchanged; bad settings name themselves."""
from __future__ import annotations

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
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=80, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                                eos_token_id=3, pad_token_id=0))
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                              eos_token_id=3, pad_token_id=0))


def _config(stage: int, pin: bool = True, max_out: int = 48) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
            "hybrid_engine": {"enabled": True, "max_out_tokens": max_out, "pin_parameters": pin}}


class _Counter:
    """Counts torch.distributed collective calls while installed."""

    NAMES = ("all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor", "broadcast", "all_to_all_single")

    def __init__(self) -> None:
        self.calls = 0
        self.saved = {n: getattr(dist, n) for n in self.NAMES}

    def __enter__(self) -> "_Counter":
        for name, fn in self.saved.items():
            def counted(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                self.calls += 1
                return _fn(*a, **k)
            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _generate(kind: str, stage: int, pin: bool) -> dict[str, Any]:
    rank = dist.get_rank()
    reference = _model(kind).eval()
    model = _model(kind)
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(stage, pin))
    assert isinstance(engine, shardspeed.DeepSpeedHybridEngine)
    ids = torch.randint(4, 80, (2, 6 + rank), generator=torch.Generator().manual_seed(rank))
    out: dict[str, Any] = {}
    tokens = engine.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    out["greedy"] = torch.equal(tokens, reference.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0))
    torch.manual_seed(7)
    sampled = engine.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(7)
    out["sampled"] = torch.equal(sampled, reference.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, pad_token_id=0))
    counts = []
    for new in (4, 16):
        with _Counter() as counter:
            engine.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        counts.append(counter.calls)
    out["collectives"] = counts
    # train between generations: the ordinary engine step still works after a generate
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    out["trained"] = torch.isfinite(loss).item()
    engine.destroy()
    return out


@pytest.mark.parametrize("kind,stage,pin", [("gpt2", 0, True), ("llama", 2, True), ("llama", 3, True),
                                            ("gpt2", 3, True), ("llama", 3, False)])
def test_generation_equals_the_unsharded_model(tmp_path: Path, kind: str, stage: int, pin: bool) -> None:
    for r in run_distributed(_generate, 2, tmp_path, kind, stage, pin, deadline=180):
        assert r["greedy"] and r["sampled"] and r["trained"], r
        if stage == 3 and pin:
            assert r["collectives"][0] == r["collectives"][1], r  # the gathers, once, whatever the length
        if stage == 3 and not pin:
            assert r["collectives"][1] > r["collectives"][0], r  # per-layer gathers every step


def _early_stop(pin: bool) -> bool:
    """Rank 1 stops at its first token (its eos is that token); rank 0 goes on for 12."""
    rank = dist.get_rank()
    reference = _model("llama").eval()
    model = _model("llama")
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(3, pin))
    ids = torch.randint(4, 80, (1, 5), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        eos = int(reference(ids).logits[0, -1].argmax()) if rank == 1 else 3
    tokens = engine.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    expected = reference.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    engine.destroy()
    return torch.equal(tokens, expected) and (rank == 0 or tokens.shape[1] == 6)


@pytest.mark.parametrize("pin", [True, False])
def test_ranks_stopping_at_different_steps_finish(tmp_path: Path, pin: bool) -> None:
    assert all(run_distributed(_early_stop, 2, tmp_path, pin, deadline=120))


def _timing_line() -> str:
    import contextlib
    import io

    model = _model("gpt2")
    engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(3))
    ids = torch.randint(4, 80, (1, 6), generator=torch.Generator().manual_seed(0))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for _ in range(2):
            engine.eval()
            engine.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
            engine.train()
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        engine.eval()
    engine.destroy()
    return printed.getvalue()


def test_eval_prints_deepspeeds_iteration_timing_line(tmp_path: Path) -> None:
    lines = [line for line in run_distributed(_timing_line, 1, tmp_path, deadline=60)[0].splitlines() if line.startswith("|E2E")]
    assert len(lines) == 2, lines
    for name in ("|E2E latency=", "|Gather latency=", "|Generate time=", "|Training time=", "|Others="):
        assert name in lines[0], lines[0]


def _lora_cycles() -> bool:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    engine, *_ = shardspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                       config=_config(3))
    base = {n: p.detach().clone() for n, p in engine.module.named_parameters() if not p.requires_grad}
    ids = torch.randint(4, 80, (1, 6), generator=torch.Generator().manual_seed(dist.get_rank()))
    for _ in range(5):
        engine.eval()
        engine.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        engine.train()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    after = {n: p.detach().clone() for n, p in engine.module.named_parameters() if not p.requires_grad}
    engine.destroy()
    return all(torch.equal(base[n], after[n]) for n in base)


def test_lora_generation_leaves_the_base_weights_bitwise_unchanged(tmp_path: Path) -> None:
    assert all(run_distributed(_lora_cycles, 2, tmp_path, deadline=180))


def _bad(case: str) -> str:
    model = _model("llama")
    try:
        if case == "too_long":
            engine, *_ = shardspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(2, max_out=16))
            engine.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=12)
        elif case == "inference_tp":
            cfg = _config(2)
            cfg["hybrid_engine"]["inference_tp_size"] = 2
            shardspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.parametrize("case,expected", [
    ("too_long", "10 prompt tokens + 12 new = 22, more than `hybrid_engine.max_out_tokens` 16"),
    ("inference_tp", "`hybrid_engine.inference_tp_size` 2"),
])
def test_bad_settings_name_themselves(tmp_path: Path, case: str, expected: str) -> None:
    for message in run_distributed(_bad, 1, tmp_path, case, deadline=60):
        assert expected in message, message
