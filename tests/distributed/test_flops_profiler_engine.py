"""The `flops_profiler` config section at world 2: the engine profiles the `profile_step`-th optimizer
step (every micro batch of it) and rank 0 alone prints it once, at that step's end, with the step's
achieved FLOP rate; under ZeRO-3 the counts are those of the whole model.
"""
from __future__ import annotations

import io
import os
from contextlib import redirect_stdout
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardspeed
from shardspeed.profiling.flops_profiler import number_to_string, params_to_string
from tests.harness import ScenarioRuns, run_named
from tests.models import CLASSES, HIDDEN, IN, TinyNet

MICRO, GAS = 4, 2
# One TinyNet forward of MICRO samples: three linears (2 FLOPs per multiply-accumulate, bias not
# counted) and two GELUs (1 per element); cross-entropy is not counted.
FORWARD_FLOPS = 2 * MICRO * (IN * HIDDEN + HIDDEN * HIDDEN + HIDDEN * CLASSES) + 2 * MICRO * HIDDEN
PARAMS = (IN + 1) * HIDDEN + (HIDDEN + 1) * HIDDEN + (HIDDEN + 1) * CLASSES


def _train(stage: int, profiler: dict[str, Any], steps: int = 4) -> dict:
    torch.manual_seed(0)
    world = dist.get_world_size()
    config = {"train_batch_size": MICRO * GAS * world, "gradient_accumulation_steps": GAS,
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": stage},
              "flops_profiler": {"enabled": True, **profiler}}
    engine, *_ = shardspeed.initialize(model=TinyNet(), config=config)
    printed_at, text = [], io.StringIO()
    with redirect_stdout(text):
        for _ in range(steps * GAS):
            x, y = torch.randn(MICRO, IN), torch.randint(0, CLASSES, (MICRO,))
            before = len(text.getvalue())
            engine.backward(engine(x, y))
            engine.step()
            if len(text.getvalue()) > before:
                printed_at.append(engine.global_steps)
    engine.destroy()
    return {"text": text.getvalue(), "printed_at": printed_at}


def _to_file(tmp: str) -> dict:
    path = os.path.join(tmp, f"profile_rank{dist.get_rank()}.txt")
    result = _train(0, {"profile_step": 2, "detailed": False, "output_file": path})
    return {**result, "file": open(path).read() if os.path.exists(path) else None}


def _pipeline() -> str:
    from torch import nn

    from shardspeed.config import ConfigError
    from shardspeed.pipe import PipelineModule

    net = PipelineModule([nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, CLASSES)], loss_fn=nn.CrossEntropyLoss(), num_stages=2)
    try:
        shardspeed.initialize(model=net, config={"train_batch_size": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                                                 "flops_profiler": {"enabled": True}})
    except ConfigError as err:
        return str(err)
    return "no error"


def _job(tmp: str) -> dict:
    return run_named({"stage0": lambda: _train(0, {}), "stage3": lambda: _train(3, {"module_depth": 0}),
                      "file": lambda: _to_file(tmp), "pipeline": _pipeline}, ["stage0", "stage3", "file", "pipeline"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "flops_engine", _job, lambda world, tmp: (str(tmp),), deadline=150)


def _value(text: str, label: str) -> str:
    line = next(line for line in text.splitlines() if line.startswith(label))
    return line[72:].strip()  # DeepSpeed's layout: the label padded to 70 columns, then two spaces


@pytest.mark.timeout(200)
@pytest.mark.parametrize("stage", [0, 3])
def test_profile_step_printed_once_on_rank_zero(runs: ScenarioRuns, stage: int) -> None:
    """Catches a profile printed on every rank, at the wrong step, once per micro batch, of one micro
    batch only, or (stage 3) of the partitioned shards instead of the whole model."""
    r0, r1 = runs(2, f"stage{stage}")
    assert r1["text"] == "" and r1["printed_at"] == []
    assert r0["printed_at"] == [2]  # profile_step 1 is the second optimizer step, printed as it ends
    text = r0["text"]
    assert text.count("Profile Summary at step 1:") == 1
    assert _value(text, "world size:") == "2" and _value(text, "data parallel size:") == "2"
    assert _value(text, "micro batches in the step:") == str(GAS)
    assert _value(text, "fwd flops per GPU:") == number_to_string(GAS * FORWARD_FLOPS)
    assert _value(text, "params per GPU:") == params_to_string(PARAMS)
    rate = _value(text, "FLOPS per GPU = 3 * fwd flops per GPU / iter latency:")
    assert rate.endswith("FLOPS") and float(rate.split()[0]) > 0
    assert ("(fc1): Linear(" in text) and ("depth 1:" in text) == (stage == 0)  # module_depth 0 at stage 3


@pytest.mark.timeout(200)
def test_output_file_written_by_rank_zero_only(runs: ScenarioRuns) -> None:
    """Catches output_file ignored (printed to stdout) or written by every rank; `detailed: false` honoured."""
    r0, r1 = runs(2, "file")
    assert r0["text"] == "" and r0["printed_at"] == []
    assert r0["file"] is not None and "Profile Summary at step 2:" in r0["file"]
    assert "Detailed Profile" not in r0["file"]
    assert r1["file"] is None


@pytest.mark.timeout(200)
def test_pipeline_engine_refuses_rather_than_ignores(runs: ScenarioRuns) -> None:
    """Catches the section silently doing nothing under train_batch (which never calls engine.forward)."""
    for message in runs(2, "pipeline"):
        assert "`flops_profiler.enabled` is not supported with a PipelineModule" in message
