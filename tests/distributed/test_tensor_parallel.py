"""Tensor parallelism over real gloo processes: sharded training equals plain data parallel.

Each training scenario trains a model twice from the same weights in one job: through the engine
with tensor parallelism (AutoTP for transformers GPT-2 / Llama, or `initialize(mpu=...)` for a
model built from shardspeed's Megatron-style layers), and as plain single-process PyTorch over the
same global batch (every data-parallel rank's micro batches, the loss averaged over them, torch's
clip_grad_norm_ and AdamW), which is what data parallelism computes. Clipping is active on every
step, so the gradient norm (sharded parameters summed over the tensor group, replicated ones
counted once) is part of what must match. Losses and norms compare at fp32 rounding (a sharded
matmul adds in another order); the gathered whole weights by their updates, relative to each
update's norm (see the training test).

All scenarios of one world size run in one spawned job (spawning dominates the cost here).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import shardspeed
from shardspeed.tensor_parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                        vocab_parallel_cross_entropy)
from shardspeed.tensor_parallel.consolidate import gather_full
from tests.harness import ScenarioRuns, run_distributed, run_named

STEPS, MICRO, SEQ, VOCAB = 3, 2, 12, 101  # 101: the vocabulary splits unevenly over 2 ranks
CLIP, LR = 0.05, 2e-3
DEADLINE = 300.0


def _hf_model(kind: str, dropout: float = 0.0) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if kind == "gpt2":  # tied LM head, fused QKV in a Conv1D
        cfg = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=SEQ,
                                      attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                                   attention_bias=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)  # untied LM head, grouped-query attention


def _ids(step: int, dp_rank: int, micro: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + 10 * dp_rank + micro)
    return torch.randint(0, VOCAB, (MICRO, SEQ), generator=g)


def _hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def _reference(make: Callable[[], nn.Module], loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
               dp: int, gas: int) -> dict[str, Any]:
    """Plain PyTorch on one process over every data-parallel rank's micro batches (what DP computes)."""
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = {}, []
    for step in range(STEPS):
        for d in range(dp):
            for m in range(gas):
                loss = loss_of(model, _ids(step, d, m))
                (loss / (gas * dp)).backward()
                losses[(step, d, m)] = loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "norms": norms, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _config(stage: int, gas: int, tp: int | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
                           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
                           "gradient_clipping": CLIP, "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}}
    if tp is not None:
        cfg["tensor_parallel"] = {"autotp_size": tp}
    return cfg


def _train(engine: Any, loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor], dp_rank: int, gas: int) -> dict[str, Any]:
    losses, norms = {}, []
    for step in range(STEPS):
        for m in range(gas):
            loss = loss_of(engine, _ids(step, dp_rank, m))
            engine.backward(loss)
            engine.step()
            losses[(step, dp_rank, m)] = loss.item()
        norms.append(engine.get_global_grad_norm())
    return {"losses": losses, "norms": norms}


def _autotp(kind: str, stage: int, tp: int = 2, gas: int = 2, bf16: bool = False,
            gradient_checkpointing: bool = False) -> dict[str, Any]:
    world = dist.get_world_size()
    model = _hf_model(kind)
    if gradient_checkpointing:  # Hugging Face's own recompute, collectives included, under AutoTP
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = _config(stage, gas, tp)
    if bf16:
        config["bf16"] = {"enabled": True}
    engine, _, loader, _ = shardspeed.initialize(model=model, config=config,
                                                 training_data=torch.utils.data.TensorDataset(torch.arange(64)))
    dp = engine.topology.axis("data")
    assert dp.size == world // tp and engine.topology.axis("tensor").size == tp
    out = _train(engine, _hf_loss, dp.rank, gas)
    out["first_batch"] = next(iter(loader))[0].tolist()  # tensor peers must read the same samples
    out["dp_rank"] = dp.rank
    out["weights"] = engine.whole_module_state_dict()
    out["reference"] = _reference(lambda: _hf_model(kind), _hf_loss, dp.size, gas)
    out["initial"] = _hf_model(kind).state_dict()
    out["shard_numel"] = sum(p.numel() for p in engine.module.parameters())
    out["full_numel"] = sum(p.numel() for p in _hf_model(kind).parameters())
    return out


def _dropout_replicas_agree() -> dict[str, Any]:
    """Ranks seeded differently (a common data-loading habit) still draw the same dropout masks on
    replicated activations: AutoTP gives the tensor group one RNG state. Replicated weights must stay
    bitwise identical across the group."""
    model = _hf_model("gpt2", dropout=0.2)
    torch.manual_seed(100 + dist.get_rank())
    engine, *_ = shardspeed.initialize(model=model, config=_config(1, 1, tp=2))
    losses = _train(engine, _hf_loss, engine.topology.axis("data").rank, 1)["losses"]
    names = ["transformer.ln_f.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.bias", "transformer.h.1.attn.c_proj.bias"]
    state = dict(engine.module.named_parameters())
    return {"losses": losses, "replicated": {n: state[n].detach().clone() for n in names}}


def _tp_model_init_world1() -> dict[str, Any]:
    model = shardspeed.tp_model_init(_hf_model("gpt2"), tp_size=1, dtype=torch.float32)
    engine, *_ = shardspeed.initialize(model=model, config=_config(1, 2, tp=1))
    out = _train(engine, _hf_loss, 0, 2)
    out["weights"] = engine.whole_module_state_dict()
    out["reference"] = _reference(lambda: _hf_model("gpt2"), _hf_loss, 1, 2)
    out["initial"] = _hf_model("gpt2").state_dict()
    return out


# ---- a Megatron-style model and mpu ----------------------------------------------------------------

class _MegatronMPU:
    """Megatron's mpu interface over groups the user made: tensor peers adjacent, as Megatron orders them."""

    def __init__(self, tp: int) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        for first in range(0, world, tp):
            group = dist.new_group(list(range(first, first + tp)))
            if first <= rank < first + tp:
                self.tp_group = group
        for offset in range(tp):
            group = dist.new_group(list(range(offset, world, tp)))
            if rank % tp == offset:
                self.dp_group = group
        self.tp, self.world = tp, world

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.tp_group

    def get_model_parallel_world_size(self) -> int:
        return self.tp

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank() % self.tp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dp_group

    def get_data_parallel_world_size(self) -> int:
        return self.world // self.tp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank() // self.tp


class _TinyMegatron(nn.Module):
    def __init__(self, tp_group: Any, hidden: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = VocabParallelEmbedding(VOCAB, hidden, tp_group=tp_group)
        self.up = ColumnParallelLinear(hidden, 4 * hidden, gather_output=False, tp_group=tp_group)
        self.down = RowParallelLinear(4 * hidden, hidden, input_is_parallel=True, tp_group=tp_group)
        self.norm = nn.LayerNorm(hidden)
        # Even split (VOCAB + 1 rows), so an rank's logits cover [rank * 51, rank * 51 + 51).
        self.head = ColumnParallelLinear(hidden, VOCAB + 1, bias=False, gather_output=False, tp_group=tp_group)
        self.tp_group = tp_group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.norm(h + self.down(F.gelu(self.up(h))))
        logits = self.head(h)
        rank = dist.get_rank(self.tp_group)
        return vocab_parallel_cross_entropy(logits, ids, rank * logits.shape[-1], self.head.tp).mean()


class _TinyDense(nn.Module):
    """The same model unsharded, drawing its initial weights in the same order."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB + 1, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        h = self.norm(h + self.down(F.gelu(self.up(h))))
        return F.cross_entropy(self.head(h).flatten(0, 1), ids.flatten())


def _mpu(stage: int) -> dict[str, Any]:
    mpu = _MegatronMPU(tp=2)
    config = _config(stage, gas=2)
    config["tensor_parallel"] = {"tp_size": 2, "mpu": None, "tp_grain_size": 64}  # as the DeepSpeed guide writes it
    engine, *_ = shardspeed.initialize(model=_TinyMegatron(mpu.get_model_parallel_group()), mpu=mpu, config=config)
    assert engine.topology.axis("data").size == mpu.get_data_parallel_world_size()
    loss_of = lambda m, ids: m(ids)  # noqa: E731
    out = _train(engine, loss_of, mpu.get_data_parallel_rank(), 2)
    out["weights"] = {k: v.clone() for k, v in engine.whole_module_state_dict().items()}
    out["reference"] = _reference(_TinyDense, loss_of, mpu.get_data_parallel_world_size(), 2)
    out["initial"] = _TinyDense().state_dict()
    return out


# ---- the layers alone --------------------------------------------------------------------------------

def _layers() -> dict[str, Any]:
    """Forward and every gradient of each layer equal the dense layer's (world 2)."""
    tp = dist.group.WORLD
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    results: dict[str, Any] = {}

    def compare(name: str, sharded: nn.Module, dense: nn.Module, inp: torch.Tensor) -> None:
        a, b = inp.clone().requires_grad_(inp.is_floating_point()), inp.clone().requires_grad_(inp.is_floating_point())
        ya, yb = sharded(a), dense(b)
        (ya * torch.arange(ya.numel()).view_as(ya).sin()).sum().backward()
        (yb * torch.arange(yb.numel()).view_as(yb).sin()).sum().backward()
        grads = {n: (gather_full(_with_marks(p.grad, p), sharded.tp), dict(dense.named_parameters())[n].grad)
                 for n, p in sharded.named_parameters()}
        results[name] = {"out": (ya.detach(), yb.detach()), "grads": grads,
                         "input_grad": (a.grad, b.grad) if a.is_floating_point() else None}

    torch.manual_seed(1)
    col = ColumnParallelLinear(16, 12, gather_output=True, tp_group=tp)
    torch.manual_seed(1)
    compare("column", col, nn.Linear(16, 12), x)
    torch.manual_seed(2)
    row = RowParallelLinear(16, 6, input_is_parallel=False, tp_group=tp)
    torch.manual_seed(2)
    compare("row", row, nn.Linear(16, 6), x)
    ids = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    emb = VocabParallelEmbedding(11, 8, padding_idx=9, tp_group=tp)  # 11 rows: 6 + 5, padding row on rank 1
    torch.manual_seed(5)
    compare("embedding", emb, nn.Embedding(11, 8, padding_idx=9), ids)

    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(6)) * 4
    target = torch.tensor([0, 5, 6, 10, -100, 3])
    start, end = (0, 6) if dist.get_rank() == 0 else (6, 11)
    mine = logits[:, start:end].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(mine, target, start, col.tp)
    (loss * torch.arange(1.0, 7.0)).sum().backward()
    full = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full, target, reduction="none", ignore_index=-100)
    (ref * torch.arange(1.0, 7.0)).sum().backward()
    results["cross_entropy"] = {"out": (loss.detach(), ref.detach()), "grads": {"logits": (mine.grad, full.grad[:, start:end])},
                                "input_grad": None}
    again = vocab_parallel_cross_entropy(mine.detach().requires_grad_(True), target, start, col.tp).sum()
    again.backward(retain_graph=True)
    try:
        again.backward()
        results["cross_entropy"]["second_backward"] = "no error"
    except RuntimeError as e:
        results["cross_entropy"]["second_backward"] = str(e)
    return results


def _with_marks(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attr):
            setattr(grad, attr, getattr(param, attr))
    return grad


# ---- checkpoints and misconfigurations -----------------------------------------------------------

def _checkpoint(save_dir: str) -> dict[str, Any]:
    """Save mid-run at tp=2, resume in a fresh engine: the next steps are bit-identical; the 16-bit
    save gathers the shards into a file the unsharded model loads."""
    def engine_() -> Any:
        return shardspeed.initialize(model=_hf_model("gpt2"), config=_config(1, 1, tp=2))[0]

    def steps(engine: Any, first: int, count: int) -> list[float]:
        out = []
        for step in range(first, first + count):
            loss = _hf_loss(engine, _ids(step, engine.topology.axis("data").rank, 0))
            engine.backward(loss)
            engine.step()
            out.append(loss.item())
        return out

    a = engine_()
    steps(a, 0, 2)
    a.save_checkpoint(save_dir, tag="t2")
    expected = steps(a, 2, 2)
    b = engine_()
    b.load_checkpoint(save_dir, tag="t2")
    resumed = steps(b, 2, 2)
    b.save_16bit_model(save_dir, "whole.bin")
    whole = b.whole_module_state_dict()
    files = sorted(p.name for p in (Path(save_dir) / "t2").iterdir())
    out = {"expected": expected, "resumed": resumed, "files": files}
    if dist.get_rank() == 0:
        plain = _hf_model("gpt2")
        plain.load_state_dict(torch.load(Path(save_dir) / "whole.bin", weights_only=True))
        ids = _ids(9, 0, 0)
        out["plain_loss"] = _hf_loss(plain, ids).item()
        out["whole_equal"] = all(torch.equal(plain.state_dict()[k], v) for k, v in whole.items())
        # The file holds the weights once: no ZeRO flat buffer behind a view, the tied head not twice.
        out["file_over_weights"] = (Path(save_dir) / "whole.bin").stat().st_size / sum(
            p.numel() * p.element_size() for p in plain.parameters())
    out["sharded_loss"] = _hf_loss(b, _ids(9, 0, 0)).item()
    return out


def _untouched_after_error(config: dict[str, Any]) -> str:
    """The error initialize raises for `config` on a GPT-2, and whether AutoTP had sharded the model by then."""
    model = _hf_model("gpt2")
    try:
        shardspeed.initialize(model=model, config=config)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        sharded = type(model.transformer.h[0].attn.c_attn).__name__ != "Conv1D"
        return f"{type(e).__name__}: {e} | sharded={sharded}"
    return "no error"


def _errors() -> dict[str, str]:
    """Each misconfiguration fails at initialize with a message naming what to change (world 2)."""
    typo = _config(1, 1, tp=2)
    typo["zero_optimization"]["stage3_prefetch_bucket_sise"] = 100
    cases = {
        "typo_before_sharding": lambda: _untouched_after_error(typo),
        "stage3_before_sharding": lambda: _untouched_after_error(_config(3, 1, tp=2)),
        "size_not_dividing_world": lambda: shardspeed.initialize(model=_hf_model("gpt2"), config=_config(1, 1, tp=3)),
        "tp_size_spelling": lambda: shardspeed.initialize(model=_hf_model("gpt2"), config={
            **_config(1, 1), "tensor_parallel": {"tp_size": 3}}),
        "stage3": lambda: shardspeed.initialize(model=_hf_model("gpt2"), config=_config(3, 1, tp=2)),
        "mpu_disagrees": lambda: shardspeed.initialize(model=_hf_model("gpt2"), mpu=_MegatronMPU(1), config=_config(1, 1, tp=2)),
        "unsupported_model": lambda: shardspeed.initialize(model=nn.Sequential(nn.Linear(4, 4)), config=_config(1, 1, tp=2)),
        "heads_not_dividing": lambda: shardspeed.initialize(model=_gpt2_three_heads(), config=_config(1, 1, tp=2)),
    }
    out = {}
    for name, make in cases.items():
        try:
            result = make()
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            out[name] = f"{type(e).__name__}: {e}"
        else:
            out[name] = result if isinstance(result, str) else "no error"
    return out


def _gpt2_three_heads() -> nn.Module:
    import transformers

    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=24, n_head=3, n_layer=1, vocab_size=VOCAB, n_positions=SEQ))


def _scenarios(save: str) -> dict[str, Callable[[], Any]]:
    return {
        "layers": _layers,
        "gpt2-s0": lambda: _autotp("gpt2", 0),
        "gpt2-s1": lambda: _autotp("gpt2", 1),
        "gpt2-s2": lambda: _autotp("gpt2", 2),
        "llama-s0": lambda: _autotp("llama", 0),
        "llama-s2": lambda: _autotp("llama", 2),
        "gpt2-s1-hf-checkpointing": lambda: _autotp("gpt2", 1, gradient_checkpointing=True),
        "llama-s1-bf16": lambda: _autotp("llama", 1, bf16=True),
        "dropout-replicas": _dropout_replicas_agree,
        "mpu-s1": lambda: _mpu(1),
        "tp_model_init-tp1": _tp_model_init_world1,
        "checkpoint": lambda: _checkpoint(save),
        "errors": _errors,
    }


PER_WORLD = {
    1: ["tp_model_init-tp1"],
    2: ["layers", "gpt2-s0", "gpt2-s1", "gpt2-s2", "llama-s0", "llama-s2", "gpt2-s1-hf-checkpointing", "llama-s1-bf16",
        "mpu-s1", "dropout-replicas", "checkpoint", "errors"],
    4: ["gpt2-s1", "llama-s2", "mpu-s1"],
}


def _run(names: list[str], save: str) -> dict[str, tuple[str, Any]]:
    return run_named(_scenarios(save), names)


def _job_args(world: int, tmp: Path) -> tuple:
    return PER_WORLD[world], str(tmp / "ckpt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "tensor_parallel", _run, _job_args, DEADLINE)


OTHERS = ("layers", "checkpoint", "errors", "dropout-replicas", "llama-s1-bf16")
TRAINING = [(w, n) for w, names in PER_WORLD.items() for n in names if n not in OTHERS]


@pytest.mark.timeout(DEADLINE + 60)
@pytest.mark.parametrize("world,name", TRAINING)
def test_tensor_parallel_training_equals_plain_data_parallel(runs: ScenarioRuns, world: int, name: str) -> None:
    results = runs(world, name)
    for rank, r in enumerate(results):
        ref = r["reference"]
        for key, loss in r["losses"].items():
            assert loss == pytest.approx(ref["losses"][key], rel=1e-5), (rank, key)
        # Clipping must act on every step, so the norm matters; it counts replicated parameters once.
        assert min(ref["norms"]) > CLIP
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref["norms"]), rtol=1e-5, atol=0)
        assert set(r["weights"]) >= set(ref["weights"])
        for key, value in ref["weights"].items():
            # Compare what training did to each tensor, relative to its size. A sharded matmul adds in
            # another order, and AdamW turns rounding noise in near-zero gradients (GPT-2's attention
            # biases, which softmax nearly ignores) into full lr-sized steps, so single elements may
            # differ by more than any fixed atol; measured across these scenarios the update differs
            # by at most 4e-5 of its norm, while a missing all-reduce or a wrong shard is ~1.
            moved = value - r["initial"][key]
            off = (r["weights"][key].float() - r["initial"][key]) - moved
            assert off.norm() <= 1e-3 * moved.norm() + 1e-7, (
                f"rank {rank}: {key} update differs by {off.norm() / max(moved.norm(), 1e-12):.2e} of its norm")
    if "first_batch" in results[0]:
        for r in results:
            peers = [o["first_batch"] for o in results if o["dp_rank"] == r["dp_rank"]]
            others = [o["first_batch"] for o in results if o["dp_rank"] != r["dp_rank"]]
            assert all(b == r["first_batch"] for b in peers) and all(b != r["first_batch"] for b in others)
    if "full_numel" in results[0]:
        # Each rank holds its shard only: less than 60 % of the model (layer norms, biases and
        # position embeddings are replicated).
        assert results[0]["shard_numel"] < 0.6 * results[0]["full_numel"]


@pytest.mark.timeout(DEADLINE + 60)
def test_bf16_tensor_parallel_tracks_fp32_plain_training(runs: ScenarioRuns) -> None:
    for r in runs(2, "llama-s1-bf16"):
        ref = r["reference"]
        for key, loss in r["losses"].items():
            assert loss == pytest.approx(ref["losses"][key], rel=2e-2), key
        torch.testing.assert_close(torch.tensor(r["norms"]), torch.tensor(ref["norms"]), rtol=5e-2, atol=0)
        # The weights moved as fp32 training moved them, up to bf16 noise (6 % measured; a missing
        # all-reduce or a wrong shard is ~100 %): compare the updates, not the weights themselves.
        moved = {k: v - r["initial"][k] for k, v in ref["weights"].items()}
        off = sum(((r["weights"][k].float() - r["initial"][k]) - d).square().sum() for k, d in moved.items())
        assert (off / sum(d.square().sum() for d in moved.values())).sqrt() < 0.15


@pytest.mark.timeout(DEADLINE + 60)
def test_dropout_on_replicated_activations_keeps_replicas_identical(runs: ScenarioRuns) -> None:
    a, b = runs(2, "dropout-replicas")
    assert a["losses"] == b["losses"]
    for name, value in a["replicated"].items():
        assert torch.equal(value, b["replicated"][name]), name


@pytest.mark.timeout(DEADLINE + 60)
def test_layers_equal_their_dense_counterparts(runs: ScenarioRuns) -> None:
    for rank, layers in enumerate(runs(2, "layers")):
        for name, r in layers.items():
            torch.testing.assert_close(*r["out"], rtol=1e-6, atol=1e-6, msg=f"rank {rank}: {name} output")
            for pname, (sharded, dense) in r["grads"].items():
                torch.testing.assert_close(sharded, dense, rtol=1e-6, atol=1e-6, msg=f"rank {rank}: {name}.{pname} grad")
            if r["input_grad"] is not None:
                torch.testing.assert_close(*r["input_grad"], rtol=1e-6, atol=1e-6, msg=f"rank {rank}: {name} input grad")
        assert layers["cross_entropy"]["out"][0][4] == 0  # ignore_index
        assert "second backward" in layers["cross_entropy"]["second_backward"]  # its gradient reuses the softmax in place


@pytest.mark.timeout(DEADLINE + 60)
def test_checkpoint_resumes_bitwise_and_16bit_save_loads_unsharded(runs: ScenarioRuns) -> None:
    results = runs(2, "checkpoint")
    for r in results:
        assert r["resumed"] == r["expected"]
    assert "mp_rank_00_model_states.pt" in results[0]["files"] and "mp_rank_01_model_states.pt" in results[0]["files"]
    assert results[0]["whole_equal"]
    assert results[0]["file_over_weights"] < 1.25, results[0]["file_over_weights"]
    assert results[0]["plain_loss"] == pytest.approx(results[0]["sharded_loss"], rel=1e-5)


@pytest.mark.timeout(DEADLINE + 60)
def test_misconfigurations_name_the_problem(runs: ScenarioRuns) -> None:
    errors = runs(2, "errors")[0]
    assert "tensor_parallel.autotp_size" in errors["size_not_dividing_world"] and "world size 2" in errors["size_not_dividing_world"]
    assert "`tensor_parallel.tp_size` 3" in errors["tp_size_spelling"]  # the key the user wrote, not its alias
    assert "zero_optimization.stage" in errors["stage3"]
    assert "mpu's tensor-parallel group has 1 ranks" in errors["mpu_disagrees"] and "autotp_size" in errors["mpu_disagrees"]
    assert "gpt2, llama" in errors["unsupported_model"]
    # The config is checked whole before AutoTP touches the model.
    typo = errors["typo_before_sharding"]
    assert "zero_optimization.stage3_prefetch_bucket_sise" in typo and "did you mean" in typo and "sharded=False" in typo
    assert "zero_optimization.stage" in errors["stage3_before_sharding"] and "sharded=False" in errors["stage3_before_sharding"]
    assert "number of attention heads" in errors["heads_not_dividing"] and "(3)" in errors["heads_not_dividing"]


def _save_then_continue(save_dir: str) -> list[float]:
    """tp=2: two steps, a checkpoint, then the two steps every resumed layout must reproduce."""
    engine = shardspeed.initialize(model=_hf_model("gpt2"), config=_config(1, 1, tp=2))[0]
    out = []
    for step in range(4):
        if step == 2:
            engine.save_checkpoint(save_dir, tag="mid")
        loss = _hf_loss(engine, _ids(step, 0, 0))
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out[2:]


def _resume_at(save_dir: str, tp: int, stage: int, save_again: str | None = None) -> dict[str, Any]:
    engine = shardspeed.initialize(model=_hf_model("gpt2"), config=_config(stage, 1, tp=tp))[0]
    engine.load_checkpoint(save_dir, tag="mid")
    if save_again is not None:  # the same state, saved at this layout
        engine.save_checkpoint(save_again, tag="mid")
    losses = []
    for step in (2, 3):
        loss = _hf_loss(engine, _ids(step, 0, 0))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "steps": engine.global_steps}


@pytest.mark.timeout(3 * DEADLINE)
def test_checkpoint_reloads_at_other_tensor_parallel_sizes(tmp_path: Path) -> None:
    """Catches a checkpoint that only loads at the tensor-parallel size it was saved at, or that cuts
    a fused QKV (stride 3) or the unevenly split vocabulary (101 rows) wrongly when resharding: the
    weights and the AdamW moments must come back, so the next losses match the uninterrupted run."""
    save, unsharded = str(tmp_path / "ckpt"), str(tmp_path / "ckpt_tp1")
    expected = run_distributed(_save_then_continue, 2, tmp_path / "save", save, deadline=DEADLINE)[0]
    # tp 2 -> 1 (re-saved there), tp 2 -> 4 with ZeRO-2, and tp 1 -> 2.
    for world, tp, stage, src, again in ((1, 1, 1, save, unsharded), (4, 4, 2, save, None), (2, 2, 1, unsharded, None)):
        results = run_distributed(_resume_at, world, tmp_path / f"tp{tp}", src, tp, stage, again, deadline=DEADLINE)
        for rank, r in enumerate(results):
            assert r["steps"] == 4
            assert r["losses"] == pytest.approx(expected, rel=1e-5), (tp, rank)
