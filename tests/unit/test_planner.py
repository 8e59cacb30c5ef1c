"""The planner without processes: `shardspeed plan` and its JSON, the activation trace, the ZeRO formulas its
layouts reduce to, and the "auto" rule of `zero_optimization.stage` / `offload_optimizer`.

How close its predictions come to real runs is tests/distributed/test_planner.py's job.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import pytest
import torch

from shardspeed.config import ConfigError, ResolveContext, complete_config, parse_strict
from shardspeed.launcher.cli import main as cli_main
from shardspeed.profiling.planner import Hardware, Option, hf_config, meta_model, parse_bytes, plan
from shardspeed.profiling.planner.activations import trace_activations
from shardspeed.profiling.planner.auto import resolve_zero_autos, sequence_length

MIB = 2 ** 20
LLAMA = ["--model", "llama", "--model-arg", "hidden_size=256", "--model-arg", "intermediate_size=512",
         "--model-arg", "num_hidden_layers=2", "--model-arg", "num_attention_heads=4", "--model-arg", "num_key_value_heads=2",
         "--model-arg", "vocab_size=1024", "--seq-len", "128", "--micro-batch", "2"]


def _llama() -> Any:
    return hf_config("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1024)


def _cpu(ranks: int = 2, per_rank: int = 2 ** 30) -> Hardware:
    return Hardware(gpus_per_node=ranks, accelerator="cpu", host_memory=per_rank * ranks, device_reserved=0)


# ---- shardspeed plan --------------------------------------------------------------------------------------
def test_cli_json_has_bytes_per_rank_per_tier_and_component_for_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Catches a --json that drops options or tiers, mislabels what fits, or ranks a slow option first."""
    assert cli_main(["plan", *LLAMA, "--json", "--nvme-space", "1TB"]) == 0
    out = json.loads(capsys.readouterr().out)
    options = out["options"]
    assert len(options) == 2 * (1 + 3 + 3 + 5)  # stages 0-3 x offloads (cpu, nvme; params at stage 3) x checkpointing
    assert [o["rank"] for o in options] == list(range(1, len(options) + 1))
    fitting = [o for o in options if o["fits"]]
    assert fitting and all(o["fits"] for o in options[:len(fitting)])  # those that fit come first
    assert [o["step_seconds"]["total"] for o in fitting] == sorted(o["step_seconds"]["total"] for o in fitting)
    for o in options:
        assert set(o["bytes_per_rank"]) == {"device", "host", "nvme"}
        device = o["bytes_per_rank"]["device"]
        assert device["activations"] > 0 and device["parameters"] > 0
        assert o["peak_bytes"]["device_per_rank"] <= sum(device.values())
        assert o["peak_bytes"]["host_per_node"] == 8 * o["peak_bytes"]["host_per_rank"]
        if o["option"]["offload_optimizer"] == "nvme":
            assert o["bytes_per_rank"]["nvme"]["nvme_optimizer_states"] > 0
    assert out["hardware"]["gpus_per_node"] == 8 and out["trainable_parameters"] > 0


def test_cli_text_ranks_names_the_fastest_and_breaks_down_each_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", *LLAMA, "--cpu", "--gpus-per-node", "2", "--host-memory", "4GiB"]) == 0
    text = capsys.readouterr().out
    assert "fastest that fits: stage " in text and '"zero_optimization": {"stage"' in text
    assert "device/rank" in text and "activations" in text and "[backward]" in text and "while loading" in text


def test_cli_says_when_nothing_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", *LLAMA, "--gpu-memory", "2.1GiB", "--host-memory", "1MB", "--no-breakdown"]) == 0
    text = capsys.readouterr().out
    assert "nothing fits" in text and "no: " in text


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert cli_main(["plan", *LLAMA, "--plot", str(tmp_path / "plan.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "plan.png").exists()


def test_plot_draws_a_png(tmp_path: Any) -> None:
    pytest.importorskip("matplotlib")
    assert cli_main(["plan", *LLAMA, "--plot", str(tmp_path / "plan.png")]) == 0
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["plan", "--model", "no_such_model", "--seq-len", "8"]) == 2
    assert "unknown model 'no_such_model'" in capsys.readouterr().err


def test_sizes_take_decimal_and_binary_units() -> None:
    assert parse_bytes("80GB") == 80 * 10 ** 9 and parse_bytes("80GiB") == 80 * 2 ** 30
    assert parse_bytes("1.5e9") == 1_500_000_000 and parse_bytes("25GB/s") == 25 * 10 ** 9
    with pytest.raises(ValueError, match="80GB"):
        parse_bytes("eighty")


# ---- what the predictions are made of -----------------------------------------------------------------------
def test_model_states_reduce_to_the_zero_formulas() -> None:
    """bf16 with Adam, per rank: 16Ψ at stage 0; 4Ψ + 12Ψ/N at stage 1; 2Ψ + 14Ψ/N at stage 2; 16Ψ/N at stage 3
    (plus Adam's step scalars and the padding of partitions, under 0.1% here)."""
    found = plan(_llama(), 16, 1, "bf16", _cpu(ranks=4), options=[Option(s) for s in (0, 1, 2, 3)])  # type: ignore[arg-type]
    psi = found.params
    states = ("parameters", "gradients", "master_weights", "optimizer_states")
    expected = {0: 16 * psi, 1: 4 * psi + 12 * psi / 4, 2: 2 * psi + 14 * psi / 4, 3: 16 * psi / 4}
    for stage, bytes_ in expected.items():
        parts = found.prediction(Option(stage)).breakdown()  # type: ignore[arg-type]
        assert sum(parts[k] for k in states) == pytest.approx(bytes_, rel=1e-3), stage


def test_meta_trace_equals_the_same_step_traced_on_cpu() -> None:
    """Catches a trace whose meta tensors differ from what the CPU allocates for the same forward and backward."""
    def module() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.LayerNorm(256), torch.nn.Linear(256, 64))

    peaks = []
    for device in ("meta", "cpu"):
        with torch.device(device):
            model = module()
        inputs = (lambda b, s, device=device: ((torch.randn(b, s, 64, device=device),), {}))
        peaks.append(trace_activations(model, 4, 32, torch.float32, False, inputs).peak)
    # input, two linear outputs, GELU and LayerNorm outputs, their gradients at the peak of backward
    assert peaks[0] == peaks[1] > 4 * 32 * 256 * 4 * 3


def test_checkpointing_and_batch_scale_traced_activations() -> None:
    model = meta_model(_llama())
    one, two = (trace_activations(meta_model(_llama()), b, 128, torch.bfloat16, False).peak for b in (1, 2))
    checkpointed = trace_activations(model, 2, 128, torch.bfloat16, True).peak
    assert two == pytest.approx(2 * one, rel=0.1)
    assert checkpointed < 0.6 * two


def test_a_real_model_is_planned_from_a_meta_copy_left_untouched() -> None:
    real = torch.nn.Sequential(torch.nn.Linear(32, 32))
    real.weight_before = real[0].weight.detach().clone()  # type: ignore[assignment]
    inputs = (lambda b, s: ((torch.randn(b, s, 32, device="meta"),), {}))
    found = plan(real, 8, 2, "fp32", _cpu(), inputs=inputs)
    assert found.params == 32 * 32 + 32
    assert real[0].weight.device.type == "cpu" and torch.equal(real[0].weight, real.weight_before)
    assert all(not o.checkpointing for o in (p.option for p in found.predictions))  # cannot switch it on here


# ---- "auto" at initialize ---------------------------------------------------------------------------------------
def _resolve(zero: dict[str, Any], hardware: Hardware, seq_len: int | None = 128) -> Any:
    parsed = parse_strict({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": zero})
    model = meta_model(_llama())

    def planner(cfg: Any, keys: frozenset[str], world: int) -> None:
        assert world == hardware.world and cfg.train_batch_size == 2 * world  # after the batch sizes are complete
        resolve_zero_autos(cfg, keys, model, hardware, seq_len)

    return complete_config(parsed, ResolveContext(dp_world_size=hardware.world, zero_planner=planner)).zero_optimization


def _peaks(hardware: Hardware, options: list[Option]) -> list[int]:
    found = plan(_llama(), 128, 2, "bf16", hardware, options=options)
    return [found.prediction(o).device if hardware.accelerator == "cuda" else found.prediction(o).host for o in options]


def test_stage_auto_takes_the_lowest_stage_that_fits(caplog: pytest.LogCaptureFixture) -> None:
    """Catches a rule that takes a higher (slower) stage than needed, or one that does not fit."""
    peaks = _peaks(_cpu(), [Option(s) for s in (0, 1, 2, 3)])  # type: ignore[arg-type]
    assert peaks[1] < peaks[0]
    with caplog.at_level(logging.INFO, "shardspeed"):
        zero = _resolve({"stage": "auto", "auto_memory_budget": (peaks[0] + peaks[1]) // 2}, _cpu())
    assert zero.stage == 1 and zero.offload_optimizer is None
    assert '"auto" -> stage 1' in caplog.text and "stage 0: " in caplog.text and "(over)" in caplog.text
    assert _resolve({"stage": "auto", "auto_memory_budget": peaks[0] + MIB}, _cpu()).stage == 0


def test_offload_auto_offloads_only_when_no_stage_fits_without() -> None:
    """On a GPU whose memory no stage fits with the optimizer on it, "auto" moves the optimizer to the host,
    at the lowest stage that then fits; with room on the device it stays there."""
    gpu = Hardware(gpus_per_node=2, gpu_memory=2 * 2 ** 30, device_reserved=0)
    stay = _peaks(gpu, [Option(s) for s in (0, 1, 2, 3)])  # type: ignore[arg-type]
    moved = _peaks(gpu, [Option(s, "cpu") for s in (1, 2, 3)])  # type: ignore[arg-type]
    budget = (min(stay) + max(moved)) // 2
    assert max(moved) < budget < min(stay)
    zero = _resolve({"stage": "auto", "offload_optimizer": "auto", "auto_memory_budget": budget}, gpu)
    assert zero.stage == 1 and zero.offload_optimizer is not None and zero.offload_optimizer.device == "cpu"
    roomy = _resolve({"stage": 2, "offload_optimizer": "auto", "auto_memory_budget": stay[2] + MIB}, gpu)
    assert roomy.stage == 2 and roomy.offload_optimizer is None


def test_when_nothing_fits_auto_takes_the_most_frugal_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "shardspeed"):
        zero = _resolve({"stage": "auto", "auto_memory_budget": MIB}, _cpu())
    assert zero.stage == 3
    assert "no option is predicted to fit" in caplog.text and "shardspeed plan" in caplog.text


def test_stage_auto_without_a_model_is_still_an_error() -> None:
    parsed = parse_strict({"train_batch_size": 2, "zero_optimization": {"stage": "auto"}})
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        complete_config(parsed, ResolveContext())


def test_activations_are_left_out_when_the_sequence_length_is_unknown(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "shardspeed"):
        _resolve({"stage": "auto", "auto_memory_budget": 2 ** 40}, _cpu(), seq_len=None)
    assert "activations not counted" in caplog.text


def test_sequence_length_is_read_from_the_first_sample() -> None:
    assert sequence_length([{"input_ids": torch.zeros(7, dtype=torch.long)}]) == 7
    assert sequence_length([(torch.zeros(5), torch.zeros(5))]) == 5
    assert sequence_length(torch.utils.data.TensorDataset(torch.zeros(3, 9))) == 9
    assert sequence_length(None) is None and sequence_length([{"text": "hi"}]) is None
