"""Activation checkpointing over real gloo processes at world size 2.

- `partition_activations`: a tiny Megatron-style mpu whose model-parallel group is the world group.
  Both ranks hold the same weights and the same input (the tensor-parallel contract for a
  partitioned activation), so each rank's checkpointed run must equal its own plain run bit for
  bit, while each rank keeps only half of every saved input.
- the RNG tracker: the model-parallel stream differs across tensor-parallel ranks, the default one
  does not.
- a Hugging Face GPT-2 with gradient checkpointing, trained by the engine under ZeRO-2 with dropout
  on, equals the same model trained without checkpointing: losses and final weights bit for bit.

All scenarios run in one spawned job (spawning dominates the cost here).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import shardspeed
from shardspeed import checkpointing as ckpt
from tests.harness import ScenarioRuns, run_named

DEADLINE = 120.0
WIDTH, BLOCKS, STEPS = 16, 3, 3


class WorldMpu:
    """Megatron's mpu with every rank in one model-parallel group (and Megatron-Core's spelling if `tensor`)."""

    def __init__(self, tensor: bool = False) -> None:
        if tensor:
            self.get_tensor_model_parallel_rank = dist.get_rank
            self.get_tensor_model_parallel_world_size = dist.get_world_size
            self.get_tensor_model_parallel_group = lambda: dist.group.WORLD

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank()

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size()

    def get_model_parallel_group(self) -> Any:
        return dist.group.WORLD


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + F.dropout(F.gelu(self.fc(x)), 0.5, self.training))


def _train_blocks(wrap: Callable[..., Any] | None, shape: tuple[int, ...]) -> list[torch.Tensor]:
    torch.manual_seed(0)  # the same weights, input and dropout masks on every rank
    blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
    x = torch.randn(*shape, WIDTH, requires_grad=True)
    h = x
    for block in blocks:
        h = wrap(block, h) if wrap else block(h)
    h.square().sum().backward()
    return [h.detach(), x.grad, *(p.grad for p in blocks.parameters())]


def _train_odd(wrap: Callable[..., Any] | None, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """One input of an odd element count (3x5): the last rank's slice is zero-padded."""
    torch.manual_seed(0)
    w = torch.randn(*shape, requires_grad=True)
    a = torch.randn(*shape, requires_grad=True)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return F.dropout((t * w).sin(), 0.5)

    out = wrap(fn, a) if wrap else fn(a)
    out.square().sum().backward()
    return [out.detach(), a.grad, w.grad]


def _partition(model: Callable[..., list[torch.Tensor]], shape: tuple[int, ...], cpu: bool, tensor_spelling: bool) -> dict:
    ckpt.unconfigure()
    plain = model(None, shape)
    ckpt.configure(WorldMpu(tensor_spelling), partition_activations=True, checkpoint_in_cpu=cpu)
    partitioned = model(ckpt.checkpoint, shape)
    stats = ckpt.saved_input_stats()
    return {"identical": [torch.equal(a, b) for a, b in zip(plain, partitioned)],
            "stats": (stats.tensors, stats.bytes_kept, stats.bytes_full, stats.devices)}


def _model_parallel_seed() -> tuple[list[float], list[float]]:
    ckpt.unconfigure()
    ckpt.configure(WorldMpu(tensor=True))
    ckpt.model_parallel_cuda_manual_seed(42)
    default = torch.rand(4).tolist()
    with ckpt.get_cuda_rng_tracker().fork():
        tracked = torch.rand(4).tolist()
    return default, tracked


def _gpt2(variant: str) -> dict:
    """Train a tiny GPT-2 (dropout 0.1 everywhere) for a few steps under the engine with ZeRO-2."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt.unconfigure()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32))
    if variant != "plain":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed it activation_checkpointing_enable
            model.gradient_checkpointing_enable()
    if variant == "shardspeed":
        # DeepSpeed users' way to route HF layers through deepspeed.checkpointing.checkpoint.
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=ckpt.checkpoint)
        ckpt.configure(None, checkpoint_in_cpu=True, profile=True)
    engine, _, _, _ = shardspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    engine.train()
    data = torch.Generator().manual_seed(100 + dist.get_rank())
    torch.manual_seed(1000 + dist.get_rank())  # the dropout stream, the same for every variant
    losses = []
    for _ in range(STEPS):
        ids = torch.randint(0, 128, (2, 16), generator=data)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    out = {"losses": losses, "params": [p.detach().clone() for p in engine.module.parameters()],
           "timings": [(t.index, t.phase) for t in ckpt.get_timings()]}
    engine.destroy()
    return out


SCENARIOS: dict[str, Callable[[], Any]] = {
    "partition": lambda: _partition(_train_blocks, (4, 5), cpu=False, tensor_spelling=False),
    "partition-cpu": lambda: _partition(_train_blocks, (2, 3), cpu=True, tensor_spelling=True),
    "partition-padded": lambda: _partition(_train_odd, (3, 5), cpu=True, tensor_spelling=False),
    "mp-seed": _model_parallel_seed,
    "gpt2-plain": lambda: _gpt2("plain"),
    "gpt2-hf": lambda: _gpt2("hf"),
    "gpt2-shardspeed": lambda: _gpt2("shardspeed"),
}


def _run(names: list[str]) -> dict[str, tuple[str, Any]]:
    return run_named(SCENARIOS, names)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "activation_checkpointing", _run, lambda world, tmp: (list(SCENARIOS),), DEADLINE)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("name,inputs,numel", [("partition", BLOCKS, 4 * 5 * WIDTH), ("partition-cpu", BLOCKS, 2 * 3 * WIDTH),
                                                ("partition-padded", 1, 15)])
def test_partitioned_activations_equal_unpartitioned_and_halve_saved_inputs(runs: ScenarioRuns, name: str, inputs: int,
                                                                             numel: int) -> None:
    """Catches a wrong slice or gather (results differ) or a rank keeping the whole input (bytes not halved)."""
    for rank, r in enumerate(runs(2, name)):
        assert all(r["identical"]), f"rank {rank}: outputs/gradients differ at {r['identical'].index(False)}"
        tensors, kept, full, devices = r["stats"]
        assert tensors == inputs and devices == {"cpu"}
        assert full == inputs * numel * 4
        assert kept == inputs * math.ceil(numel / 2) * 4, "each rank must keep half of each saved input (rounded up)"


@pytest.mark.timeout(180)
def test_model_parallel_seed_differs_only_on_the_tracked_stream(runs: ScenarioRuns) -> None:
    """Catches the same dropout mask in every tensor-parallel shard, or replicated regions drawing differently."""
    (default0, tracked0), (default1, tracked1) = runs(2, "mp-seed")
    assert default0 == default1
    assert tracked0 != tracked1


@pytest.mark.timeout(180)
def test_hf_gradient_checkpointing_under_the_engine_matches_no_checkpointing(runs: ScenarioRuns) -> None:
    """Catches checkpointing that changes training: different dropout in the recompute, lost or doubled gradients."""
    plain, hf, ours = (runs(2, f"gpt2-{v}") for v in ("plain", "hf", "shardspeed"))
    for rank in range(2):
        for label, other in (("torch checkpoint", hf[rank]), ("shardspeed checkpoint", ours[rank])):
            assert other["losses"] == plain[rank]["losses"], f"rank {rank}, {label}"
            assert all(torch.equal(a, b) for a, b in zip(plain[rank]["params"], other["params"])), f"rank {rank}, {label}"
        assert plain[rank]["timings"] == [] and hf[rank]["timings"] == []
        # Calls are numbered since configure(): two layers per step, recomputed in reverse.
        expected = [(2 * s + i, phase) for s in range(STEPS) for i, phase in ((0, "forward"), (1, "forward"), (1, "recompute"), (0, "recompute"))]
        assert ours[rank]["timings"] == expected, "shardspeed's checkpoint did not run for both layers"
    assert plain[0]["losses"] != plain[1]["losses"], "ranks saw the same data: the test would not see a reduction bug"
    assert all(torch.equal(a, b) for a, b in zip(plain[0]["params"], plain[1]["params"]))


