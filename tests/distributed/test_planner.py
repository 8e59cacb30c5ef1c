"""The planner's predictions against what real gloo processes hold, and "auto" resolved by it at initialize.

A 13.7M-parameter GPT-2 (4 layers, width 512, vocabulary 2048) trains in bf16 on one sequence of
128 tokens per micro step, under every stage with and without CPU offload and activation
checkpointing, at world 1 and 2. Per rank that is 130-310 MiB, mostly model states. One spawned
job per world size measures every option in turn: the resident size before its model is built,
then the peak over its second step (the first creates the optimizer states; a first option, not
measured, pays the process's one-time lazy allocations). glibc is set to return every block of
128 KiB or more to the OS when freed and to keep one heap for all threads, so that the resident size
follows live memory rather than where freed blocks happened to fall in the heaps.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

from shardspeed.profiling.planner import Hardware, Option, plan
from tests.harness import ScenarioRuns, run_named
from tests.memory import (current_rss, fixed_mmap_threshold, one_malloc_arena, peak_rss_since_reset, release_free_memory,
                          reset_peak_rss)

SEQ, MICRO = 128, 1
GPT2 = dict(n_layer=4, n_embd=512, n_head=4, vocab_size=2048, n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)
OPTIONS = [Option(stage, home, checkpointing=ckpt) for ckpt in (False, True) for stage in (0, 1, 2, 3)
           for home in (("none",) if stage == 0 else ("none", "cpu"))]
NVME_OPTIONS = [Option(2, "nvme"), Option(3, "nvme", "nvme")]  # measured at world 1 only
# Swap buffers become resident as they are first used, one more per sub-group step: with two optimizer
# buffers both are by the third step, the steady state the planner (which counts them all) predicts.
NVME_BUFFERS = {"offload_optimizer": {"buffer_count": 2}}
# Stage 3 gathering little at a time, so that under the "auto" scenario's budget only stage 3 fits.
LEAN_STAGE3 = {"stage3_max_live_parameters": 1 << 20, "stage3_prefetch_bucket_size": 1 << 19, "stage3_max_reuse_distance": 0}
MIB = 2 ** 20

# Measured here the prediction is within 4% (docs/observability.md, "How close"); the margin covers the few MiB of a
# step's bookkeeping the planner does not model, and a missed or doubled gradient partition (26 MiB) fails it.
PEAK_TOLERANCE = 0.10
# Blocks from 128 KiB go back to the OS when freed (glibc's starting mmap threshold, kept fixed); the
# planner counts the heap pages of smaller ones as staying resident (`Hardware.mmap_threshold`).
HEAP_LIMIT = 128 * 1024
STATE_TOLERANCE = 0.02  # the bound; the planner uses ZeRO's own layout code, so it is exact here


def _hf_config() -> Any:
    import transformers

    return transformers.GPT2Config(**GPT2)


def _config(zero: dict[str, Any]) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": MICRO, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_optimization": zero}


def _model(checkpointing: bool) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_hf_config())
    if checkpointing:
        # Reentrant: with Hugging Face's default (non-reentrant) checkpointing a stage-3 backward fails,
        # because the recompute inside backward releases the units it gathers before their gradients run.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def _zero_section(option: Option, nvme: str) -> dict[str, Any]:
    section = option.zero_section()
    for key in ("offload_optimizer", "offload_param"):
        if option.zero_section().get(key) == {"device": "nvme"}:
            section[key] = {"device": "nvme", "nvme_path": nvme, **NVME_BUFFERS.get(key, {})}
    return section


def _measure(option: Option, nvme: str = "", steps: int = 2) -> dict[str, Any]:
    """Peak resident growth over the last training step, from before the model was built; memory_breakdown()."""
    import shardspeed

    release_free_memory()
    base = current_rss()
    engine, *_ = shardspeed.initialize(model=_model(option.checkpointing), config=_config(_zero_section(option, nvme)))
    ids = torch.randint(0, GPT2["vocab_size"], (MICRO, SEQ), generator=torch.Generator().manual_seed(1))
    for step in range(steps):
        if step == steps - 1:
            reset_peak_rss()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    result = {"growth": peak_rss_since_reset() - base, "breakdown": engine.memory_breakdown()}
    engine.destroy()
    return result


def _auto(budget: int) -> dict[str, Any]:
    """initialize with "stage": "auto" under a budget only stage 3 fits: the stage it chose and what it logged."""
    import logging

    import shardspeed

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    logger = logging.getLogger("shardspeed")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        config = _config({"stage": "auto", "auto_memory_budget": budget, **LEAN_STAGE3})
        data = [{"input_ids": torch.zeros(SEQ, dtype=torch.long)}] * 4  # initialize reads the sequence length here
        engine, *_ = shardspeed.initialize(model=_model(False), config=config, training_data=data)
        stage = engine.zero_optimization_stage()
        engine.destroy()
    finally:
        logger.removeHandler(handler)
    return {"stage": stage, "log": records}


def _job(budget: int | None, nvme: str) -> dict:
    fixed_mmap_threshold(HEAP_LIMIT)
    one_malloc_arena()
    _measure(OPTIONS[0])  # warm-up, not measured
    scenarios = {option.label: (lambda option=option: _measure(option)) for option in OPTIONS}
    if budget is not None:
        scenarios["auto"] = lambda: _auto(budget)
    else:
        scenarios.update({option.label: (lambda option=option: _measure(option, nvme, steps=3)) for option in NVME_OPTIONS})
    return run_named(scenarios, list(scenarios))


def _hardware(world: int) -> Hardware:
    return Hardware(gpus_per_node=world, accelerator="cpu", host_memory=16 * 2 ** 30, device_reserved=0,
                    mmap_threshold=HEAP_LIMIT)


def _auto_budget(world: int) -> int | None:
    """Halfway between stage 3's predicted peak and the least of stages 0-2's (lean stage-3 settings);
    None at world 1, where stage 3 partitions nothing."""
    if world == 1:
        return None
    found = plan(_hf_config(), SEQ, MICRO, "bf16", _hardware(world), zero=LEAN_STAGE3,
                 options=[Option(stage) for stage in (0, 1, 2, 3)])
    peaks = [found.prediction(Option(stage)).host for stage in (0, 1, 2, 3)]
    assert peaks[3] < min(peaks[:3]), f"stage 3 must be the only stage under some budget: {peaks}"
    return (peaks[3] + min(peaks[:3])) // 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "planner", _job, lambda world, tmp: (_auto_budget(world), str(tmp)), deadline=170)


@pytest.fixture(scope="module")
def predictions() -> dict[int, Any]:
    return {world: plan(_hf_config(), SEQ, MICRO, "bf16", _hardware(world), zero=NVME_BUFFERS, options=OPTIONS + NVME_OPTIONS)
            for world in (1, 2)}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.label.replace(" ", "").replace(",", "-"))
def test_predicted_peak_and_model_states_match_the_run(runs: ScenarioRuns, predictions: dict[int, Any], world: int,
                                                       option: Option) -> None:
    """Catches a planner whose model-state arithmetic drifts from the strategies' (padding, masters only for
    16-bit, stage-2 partitions, stage-3 units, offload homes) or whose peak misses or double-counts a component."""
    predicted = predictions[world].prediction(option)
    expected = predicted.breakdown()
    for rank, measured in enumerate(runs(world, option.label)):
        for key, value in measured["breakdown"].items():
            assert key in expected, f"rank {rank}: the engine reports {key!r}, the planner has no such component"
            assert abs(expected[key] - value) <= STATE_TOLERANCE * value + 64, (
                f"rank {rank} {key}: predicted {expected[key]}, memory_breakdown() {value}")
        growth = measured["growth"]
        assert abs(predicted.host - growth) <= PEAK_TOLERANCE * growth, (
            f"rank {rank}: predicted host peak {predicted.host / MIB:.1f} MiB, measured growth {growth / MIB:.1f} MiB "
            f"({100 * (predicted.host - growth) / growth:+.1f}%)")


@pytest.mark.timeout(300)
def test_stage_auto_picks_the_only_stage_that_fits_and_says_why(runs: ScenarioRuns) -> None:
    """Catches "auto" left at the default stage, a rule that takes a stage that does not fit, or a silent choice."""
    results = runs(2, "auto")
    for rank, result in enumerate(results):
        assert result["stage"] == 3, f"rank {rank} chose stage {result['stage']}"
    lines = [line for line in results[0]["log"] if '"auto"' in line]
    assert lines and "-> stage 3" in lines[0] and "fit" in lines[0], results[0]["log"]
    for stage in (0, 1, 2):  # and says why the lower stages were not taken
        assert f"stage {stage}: " in lines[0] and "(over)" in lines[0], lines[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("option", NVME_OPTIONS, ids=lambda o: o.label.replace(" ", "").replace(",", "-"))
def test_nvme_homes_match_the_run(runs: ScenarioRuns, predictions: dict[int, Any], option: Option) -> None:
    """Catches NVMe swap arithmetic (aligned sub-group footprints, buffer pools, swapped partitions) drifting
    from the offload code's; the resident peak is checked as for CPU offload."""
    predicted = predictions[1].prediction(option)
    expected = predicted.breakdown()
    measured = runs(1, option.label)[0]
    for key, value in measured["breakdown"].items():
        if key == "nvme_file":  # the optimizer's swap file: its masters and states, laid out aligned
            key, value = "nvme_master_weights + nvme_optimizer_states", value
            expected[key] = expected["nvme_master_weights"] + expected["nvme_optimizer_states"]
        assert key in expected, f"the engine reports {key!r}, the planner has no such component"
        assert abs(expected[key] - value) <= STATE_TOLERANCE * value + 64, (
            f"{key}: predicted {expected[key]}, memory_breakdown() {value}")
    growth = measured["growth"]
    assert abs(predicted.host - growth) <= PEAK_TOLERANCE * growth, (
        f"predicted host peak {predicted.host / MIB:.1f} MiB, measured growth {growth / MIB:.1f} MiB")
