"""Activation checkpointing (`shardspeed.checkpointing`): DeepSpeed's API, one process, no collectives.

Equivalence is the proof: a checkpointed function gives bit-identical outputs and gradients to the
same function run plainly from the same RNG state, dropout included (the recompute must replay the
same masks). On CPU the two runs execute the same kernels in the same order, so bitwise equality is
the right bar; any difference is a missed RNG restore or a changed input.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shardspeed
from shardspeed import checkpointing as ckpt
from shardspeed.config import ConfigError, load_config


@pytest.fixture(autouse=True)
def _fresh_state() -> Iterator[None]:
    ckpt.unconfigure()
    ckpt.get_cuda_rng_tracker().reset()
    yield
    ckpt.unconfigure()
    ckpt.get_cuda_rng_tracker().reset()


class Block(nn.Module):
    def __init__(self, width: int = 16, p: float = 0.5) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + F.dropout(F.gelu(self.fc(x)), self.p, self.training))


def _stack(n: int = 3, width: int = 16) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(Block(width) for _ in range(n))


def _run(blocks: nn.ModuleList, x: torch.Tensor, wrap: Callable[..., Any] | None, seed: int = 7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward from RNG seed `seed`; returns the output and every gradient (inputs first)."""
    for p in blocks.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    torch.manual_seed(seed)
    h = x
    for block in blocks:
        h = wrap(block, h) if wrap else block(h)
    (h * torch.linspace(-1, 1, h.shape[-1], device=h.device)).sum().backward()
    grads = ([x.grad] if x.requires_grad else []) + [p.grad for p in blocks.parameters()]
    return h.detach(), grads


def _assert_identical(a: tuple[torch.Tensor, list[torch.Tensor]], b: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    assert torch.equal(a[0], b[0]), "outputs differ"
    assert len(a[1]) == len(b[1])
    for i, (ga, gb) in enumerate(zip(a[1], b[1])):
        assert ga is not None and gb is not None, f"gradient {i} missing"
        assert torch.equal(ga, gb), f"gradient {i} differs"


@pytest.mark.timeout(30)
def test_checkpoint_matches_plain_bitwise_with_dropout() -> None:
    """Catches a recompute that draws new dropout masks (RNG state not restored) or drops a gradient."""
    blocks, x = _stack(), torch.randn(4, 5, 16, requires_grad=True)
    plain = _run(blocks, x, None)
    checkpointed = _run(blocks, x, ckpt.checkpoint)
    _assert_identical(plain, checkpointed)
    other_seed = _run(blocks, x, None, seed=8)
    assert not torch.equal(plain[0], other_seed[0]), "dropout is inactive: the test would prove nothing"
    # The recompute must leave the global RNG where the plain run leaves it.
    torch.manual_seed(7)
    for block in blocks:
        block(x)
    after_plain = torch.get_rng_state()
    _run(blocks, x, ckpt.checkpoint)
    assert torch.equal(torch.get_rng_state(), after_plain)


@pytest.mark.timeout(30)
def test_multiple_outputs_kwargs_and_non_tensor_args() -> None:
    """Catches lost gradients through a keyword tensor, mangled non-tensor outputs, or misrouted arguments."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)

    def fn(x: torch.Tensor, n: int, flag: bool, nothing: None, *, bias: torch.Tensor, tag: str = "") -> tuple:
        assert n == 3 and flag is True and nothing is None and tag == "t"
        h = F.dropout(lin(x) + bias, 0.5)
        return h * n, {"sum": h.sum(), "argmax": h.argmax(-1), "tag": tag}, 7

    def run(wrap: bool) -> tuple[list[torch.Tensor], Any, int]:
        lin.zero_grad(set_to_none=True)
        x = torch.arange(24.0).view(4, 6).div(10).requires_grad_()
        bias = torch.ones(6).requires_grad_()
        torch.manual_seed(3)
        args = (x, 3, True, None)
        out = ckpt.checkpoint(fn, *args, bias=bias, tag="t") if wrap else fn(*args, bias=bias, tag="t")
        h, extras, seven = out
        (h.square().sum() + extras["sum"]).backward()
        return [h.detach(), x.grad, bias.grad, lin.weight.grad, extras["argmax"]], extras["tag"], seven

    plain, checkpointed = run(False), run(True)
    for a, b in zip(plain[0], checkpointed[0]):
        assert torch.equal(a, b)
    assert checkpointed[1:] == ("t", 7)
    assert checkpointed[0][4].dtype == torch.int64 and not checkpointed[0][4].requires_grad


@pytest.mark.timeout(30)
def test_inputs_without_grad_still_train_the_parameters() -> None:
    """Catches the reentrant-checkpoint failure: no input requires grad, so parameters get no gradient."""
    blocks, x = _stack(), torch.randn(2, 3, 16)  # x.requires_grad is False (e.g. embeddings from a frozen table)
    _assert_identical(_run(blocks, x, None), _run(blocks, x, ckpt.checkpoint))


@pytest.mark.timeout(30)
def test_nested_checkpoints_and_autograd_grad() -> None:
    """Catches a checkpoint that cannot nest or that breaks torch.autograd.grad (DeepSpeed's reentrant one raises)."""
    blocks, x = _stack(), torch.randn(2, 3, 16, requires_grad=True)

    def pair(h: torch.Tensor) -> torch.Tensor:
        return blocks[1](ckpt.checkpoint(blocks[0], h))

    def outer(h: torch.Tensor, wrap: bool) -> torch.Tensor:
        return blocks[2](ckpt.checkpoint(pair, h) if wrap else blocks[1](blocks[0](h)))

    grads = []
    for wrap in (False, True):
        torch.manual_seed(5)
        out = outer(x, wrap)
        grads.append(torch.autograd.grad(out.sum(), [x, *blocks.parameters()]))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.timeout(30)
def test_no_grad_forward_runs_plainly() -> None:
    """Catches a checkpoint that fails, or records a recompute, when there is no backward (evaluation)."""
    ckpt.configure(None, profile=True, checkpoint_in_cpu=True)
    blocks, x = _stack(), torch.randn(2, 3, 16)
    blocks.eval()
    with torch.no_grad():
        out = ckpt.checkpoint(blocks[0], x)
    assert torch.equal(out, blocks[0](x)) and not out.requires_grad
    assert [t.phase for t in ckpt.get_timings()] == ["forward"]
    assert ckpt.saved_input_stats().tensors == 0


# ---- RNG tracker ----------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_tracker_fork_replays_in_recompute() -> None:
    """Catches a recompute that draws tracker-forked dropout from the advanced state (wrong mask in backward)."""
    ckpt.model_parallel_cuda_manual_seed(1234)
    tracker = ckpt.get_cuda_rng_tracker()
    blocks = _stack()

    def fn(h: torch.Tensor) -> torch.Tensor:
        with tracker.fork():
            h = F.dropout(blocks[0](h), 0.5)  # a "model-parallel region": mask from the tracked state
        return F.dropout(blocks[1](h), 0.5)  # default generator

    results, states = [], []
    x = torch.randn(3, 16, requires_grad=True)
    for wrap in (False, True):
        blocks.zero_grad(set_to_none=True)
        x.grad = None
        ckpt.model_parallel_cuda_manual_seed(1234)  # also seeds the default generator
        out = ckpt.checkpoint(fn, x) if wrap else fn(x)
        out.square().sum().backward()
        results.append([out.detach(), x.grad, *(p.grad for p in blocks.parameters() if p.grad is not None)])
        states.append((tracker.get_states()["model-parallel-rng"].clone(), torch.get_rng_state()))
    assert len(results[0]) == len(results[1]) > 2
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # The recompute restores the tracker: both runs advance it (and the default generator) identically.
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])


@pytest.mark.timeout(30)
def test_second_backward_recomputes_with_the_same_masks() -> None:
    """Catches a recompute context that cannot be entered twice or whose tracker snapshot the first recompute advanced."""
    ckpt.model_parallel_cuda_manual_seed(99)
    tracker = ckpt.get_cuda_rng_tracker()
    lin = nn.Linear(8, 8)

    def fn(h: torch.Tensor) -> torch.Tensor:
        with tracker.fork():
            return F.dropout(lin(h), 0.5)

    out = ckpt.checkpoint(fn, torch.randn(4, 8, requires_grad=True))
    grads = []
    for _ in range(2):
        lin.zero_grad(set_to_none=True)
        out.square().sum().backward(retain_graph=True)
        grads.append(lin.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.timeout(30)
def test_tracker_api_matches_megatron() -> None:
    """Catches a fork that disturbs the default generator, reused seeds, or a wrong model-parallel seed."""
    tracker = ckpt.get_cuda_rng_tracker()
    tracker.add("a", 11)
    with pytest.raises(ValueError, match="seed 11"):
        tracker.add("b", 11)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 12)
    with pytest.raises(KeyError, match="never added"):
        with tracker.fork("zzz"):
            pass
    torch.manual_seed(0)
    default_before = torch.get_rng_state()
    snapshot = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), default_before), "fork moved the default generator"
    torch.manual_seed(11)
    assert torch.equal(first, torch.rand(3)), "state 'a' is not seeded with 11"
    with tracker.fork("a"):
        second = torch.rand(3)
    assert not torch.equal(first, second), "fork did not store the advanced state"
    tracker.set_states(snapshot)
    with tracker.fork("a"):
        assert torch.equal(torch.rand(3), first), "set_states did not restore the snapshot"

    class Mpu:  # tensor-parallel rank 1 of 1 would be odd; only the rank is read here
        def get_tensor_model_parallel_rank(self) -> int:
            return 1

        def get_tensor_model_parallel_world_size(self) -> int:
            return 1

        def get_tensor_model_parallel_group(self) -> None:
            return None

    ckpt.configure(Mpu())
    ckpt.model_parallel_cuda_manual_seed(100)
    default_draw = torch.rand(2)
    with tracker.fork():
        tracked_draw = torch.rand(2)
    torch.manual_seed(100)
    assert torch.equal(default_draw, torch.rand(2)), "default generator not seeded with the seed itself"
    torch.manual_seed(100 + 2718 + 1)
    assert torch.equal(tracked_draw, torch.rand(2)), "model-parallel state is not seed + 2718 + tp rank"


# ---- configure ------------------------------------------------------------------------------------

SECTION = {"activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True,
                                        "number_checkpoints": 4, "synchronize_checkpoint_boundary": True, "profile": True}}


@pytest.mark.timeout(30)
def test_configure_arguments_override_the_config(tmp_path) -> None:
    """Catches config values winning over explicit arguments, or a config form (dict/path/JSON/parsed) ignored."""
    assert not ckpt.is_configured() and ckpt.settings() == ckpt.CheckpointSettings()
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_batch_size": 8, **SECTION}))
    forms = {"dict": SECTION, "path": str(path), "json": json.dumps(SECTION), "parsed": load_config(str(path))}
    for form, config in forms.items():
        ckpt.configure(None, deepspeed_config=config, profile=False, checkpoint_in_cpu=False, num_checkpoints=2)
        assert ckpt.is_configured()
        assert ckpt.settings() == ckpt.CheckpointSettings(
            partition_activations=True, cpu_checkpointing=False, number_checkpoints=2,
            synchronize_checkpoint_boundary=True, profile=False), form
    ckpt.configure(None, partition_activations=True, contiguous_checkpointing=True, num_checkpoints=3, synchronize=True)
    assert ckpt.settings() == ckpt.CheckpointSettings(True, True, False, 3, True, False), "no config: the defaults, then the arguments"


@pytest.mark.timeout(30)
def test_configure_rejects_bad_settings_and_keeps_the_previous_ones() -> None:
    """Catches typos accepted silently, DeepSpeed's contiguous-checkpointing rules unchecked, or a half-applied configure."""
    ckpt.configure(None, profile=True)
    before = ckpt.settings()
    with pytest.raises(ConfigError, match=r"activation_checkpointing.cpu_checkpointng.*did you mean.*cpu_checkpointing"):
        ckpt.configure(None, {"activation_checkpointing": {"cpu_checkpointng": True}})
    with pytest.raises(ConfigError, match="needs `partition_activations: true`"):
        ckpt.configure(None, contiguous_checkpointing=True, num_checkpoints=2)
    with pytest.raises(ConfigError, match="needs `number_checkpoints`"):
        ckpt.configure(None, partition_activations=True, contiguous_checkpointing=True)
    with pytest.raises(ConfigError, match="must be positive"):
        ckpt.configure(None, num_checkpoints=0)
    with pytest.raises(ConfigError, match=r'`activation_checkpointing.profile` are "auto"'):
        ckpt.configure(None, {"activation_checkpointing": {"profile": "auto"}})
    assert ckpt.settings() == before


class _Mpu:
    """Megatron's older spelling (`get_model_parallel_*`), tensor-parallel size 1."""

    def get_model_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_group(self) -> None:
        return None


@pytest.mark.timeout(30)
def test_mpu_is_kept_across_configure_calls_and_size_one_partitions_nothing() -> None:
    """Catches configure(None) forgetting the mpu (DeepSpeed keeps it) or partitioning at tensor-parallel size 1."""
    ckpt.configure(_Mpu(), partition_activations=True)
    ckpt.configure(None, partition_activations=True)
    assert ckpt.activations._mpu is not None
    assert ckpt.activations._checkpointer.tp == ckpt.TensorParallelGroup(0, 1, None)
    blocks, x = _stack(), torch.randn(2, 3, 16, requires_grad=True)
    _assert_identical(_run(blocks, x, None), _run(blocks, x, ckpt.checkpoint))
    assert ckpt.saved_input_stats().tensors == 0, "tp=1: nothing to partition, no hooks installed"



# ---- behaviour of the settings ----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_cpu_checkpointing_keeps_inputs_on_the_host_without_changing_results() -> None:
    """Catches offload that changes results, or that packs parameters and integer tensors it should leave alone."""
    blocks, x = _stack(), torch.randn(2, 3, 16, requires_grad=True)
    plain = _run(blocks, x, None)
    ckpt.configure(None, checkpoint_in_cpu=True, synchronize=True)
    _assert_identical(plain, _run(blocks, x, ckpt.checkpoint))
    stats = ckpt.saved_input_stats()
    assert stats.tensors == 3 and stats.devices == {"cpu"}  # one hidden-state input per block
    assert stats.bytes_kept == stats.bytes_full == 3 * x.numel() * 4

    ckpt.reset()
    weight = nn.Parameter(torch.randn(4, 4))
    index = torch.tensor([0, 2])
    out = ckpt.checkpoint(lambda a, w, i: (a @ w)[i], torch.randn(3, 4), weight, index)
    out.sum().backward()
    assert ckpt.saved_input_stats().tensors == 1, "the parameter and the index tensor must pass through"


@pytest.mark.timeout(30)
def test_profile_records_forward_and_recompute_of_each_checkpoint(caplog) -> None:
    """Catches `profile` recording nothing, missing the recompute, or not logging."""
    ckpt.configure(None, profile=True)
    blocks, x = _stack(), torch.randn(2, 3, 16, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="shardspeed"):
        _run(blocks, x, ckpt.checkpoint)
    timings = ckpt.get_timings()
    assert [(t.index, t.phase) for t in timings] == [(0, "forward"), (1, "forward"), (2, "forward"),
                                                     (2, "recompute"), (1, "recompute"), (0, "recompute")]
    assert all(t.ms >= 0 for t in timings)
    assert sum("activation checkpoint 2 recompute" in r.getMessage() for r in caplog.records) == 1
    ckpt.reset()
    assert ckpt.get_timings() == [] and ckpt.saved_input_stats().tensors == 0


@pytest.mark.timeout(30)
def test_deepspeed_import_paths() -> None:
    """Catches a DeepSpeed spelling that does not resolve: shardspeed.checkpointing and the runtime module path."""
    from shardspeed.runtime.activation_checkpointing import checkpointing

    assert shardspeed.checkpointing is ckpt
    for name in ("configure", "checkpoint", "non_reentrant_checkpoint", "is_configured", "reset", "get_cuda_rng_tracker",
                 "model_parallel_cuda_manual_seed", "model_parallel_reconfigure_tp_seed", "CudaRNGStatesTracker",
                 "partition_activations_in_checkpoint", "set_num_layers"):
        assert getattr(checkpointing, name) is getattr(ckpt, name), name
    # DeepSpeed-private names that Megatron forks import directly.
    assert checkpointing._CUDA_RNG_STATE_TRACKER is ckpt.get_cuda_rng_tracker()
    assert checkpointing._MODEL_PARALLEL_RNG_TRACKER_NAME == "model-parallel-rng"
    ckpt.set_num_layers(5)
    ckpt.partition_activations_in_checkpoint(True)
    assert ckpt.settings().number_checkpoints == 5 and ckpt.settings().partition_activations


@pytest.mark.gpu
@pytest.mark.timeout(60)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_checkpointing_moves_cuda_inputs_to_pinned_host_memory() -> None:
    """Catches cpu_checkpointing leaving inputs on the device, or a host round trip that changes results."""
    blocks = _stack().cuda()
    x = torch.randn(2, 3, 16, device="cuda", requires_grad=True)
    torch.manual_seed(7)
    plain = _run(blocks, x, None)
    ckpt.configure(None, checkpoint_in_cpu=True)
    _assert_identical(plain, _run(blocks, x, ckpt.checkpoint))
    stats = ckpt.saved_input_stats()
    assert stats.devices == {"cpu"} and stats.tensors == 3
