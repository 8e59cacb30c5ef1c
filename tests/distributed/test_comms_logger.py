"""The comms logger at world 2 over gloo: every collective a ZeRO-2 and a ZeRO-3 step issues is in its
records, with DeepSpeed's message sizes, as a wrapper of the test's own around torch.distributed sees them.

All scenarios run in one spawned job (spawning dominates the cost); each is checked by its own test.
"""
from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

import pytest
import torch
import torch.distributed as dist

import shardspeed
from tests.harness import ScenarioRuns, run_named
from tests.models import IN, TinyNet

# The test's own idea of each collective's message: which argument (position, keyword) holds the input
# whose bytes DeepSpeed logs, written out here rather than read from the logger.
INPUT_ARG = {"all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "all_gather": (1, "tensor"),
             "all_gather_into_tensor": (1, "input_tensor"), "reduce_scatter_tensor": (1, "input"),
             "all_to_all_single": (1, "input"), "isend": (0, "tensor"), "irecv": (0, "tensor"), "send": (0, "tensor"),
             "recv": (0, "tensor"), "barrier": (None, None)}


@contextmanager
def _observed() -> Iterator[Counter]:
    """Count (op, input bytes) of every torch.distributed collective called inside the block."""
    seen: Counter = Counter()
    saved = {name: getattr(dist, name) for name in INPUT_ARG}

    def spy(name: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            pos, key = INPUT_ARG[name]
            x = None if pos is None else (args[pos] if len(args) > pos else kwargs[key])
            seen[(name, 0 if x is None else x.numel() * x.element_size())] += 1
            return inner(*args, **kwargs)
        return call
    for name, inner in saved.items():
        setattr(dist, name, spy(name, inner))
    try:
        yield seen
    finally:
        for name, inner in saved.items():
            setattr(dist, name, inner)


def _logged() -> Counter:
    raw = shardspeed.comm.comms_logger.get_raw_data()
    return Counter({(name, size): rec[0] for name, sizes in raw.items() for size, rec in sizes.items()})


def _step(stage: int, native: bool) -> dict:
    from shardspeed.comm.collectives import CommPolicy

    torch.manual_seed(0)
    config = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 300, "stage3_param_persistence_threshold": 0},
              "comms_logger": {"enabled": True}}
    engine, *_ = shardspeed.initialize(model=TinyNet(), config=config)
    if native:  # NCCL's implementations (reduce-scatter, all-gather), exercised on gloo
        engine.strategy.reducer.policy = CommPolicy.native()
        if stage == 3:
            engine.strategy.manager.set_policy(CommPolicy.native())
        else:
            engine.strategy.policy = CommPolicy.native()
    x, y = torch.randn(4, IN), torch.randint(0, 4, (4,))
    shardspeed.comm.reset_log()
    with _observed() as seen:
        engine.backward(engine(x, y))
        engine.step()
    logged = _logged()
    raw = shardspeed.comm.comms_logger.get_raw_data()
    latencies = {name: sum(len(rec[1]) for rec in sizes.values()) for name, sizes in raw.items()}
    engine.destroy()
    shardspeed.comm.configure(enabled=False)
    return {"seen": seen, "logged": logged, "latencies": latencies}


def _summary() -> dict:
    shardspeed.comm.configure(enabled=True, prof_all=True)
    shardspeed.comm.reset_log()
    t = torch.ones(1000)
    for _ in range(3):
        dist.all_reduce(t)
    out = torch.empty(2000)
    dist.all_gather_into_tensor(out, t)
    text = io.StringIO()
    with redirect_stdout(text):
        result = shardspeed.comm.log_summary(return_dict=True, show_straggler=True)
    shardspeed.comm.configure(enabled=False)
    return {"text": text.getvalue(), "summary": result["summary"], "straggler": result["straggler_analysis"],
            "metadata": result["metadata"]}


def _options() -> dict:
    original = dist.all_reduce
    shardspeed.comm.configure(enabled=True, prof_all=False, prof_ops=["broadcast"])
    shardspeed.comm.reset_log()
    t = torch.ones(8)
    dist.all_reduce(t)  # not profiled: prof_all off and not in prof_ops
    dist.broadcast(t, src=0)
    shardspeed.comm.all_reduce(t, log_name="my_sum", prof=True)  # DeepSpeed's keywords: profiled under its name
    ops = sorted(shardspeed.comm.get_logged_comm_ops())
    shardspeed.comm.configure(prof_all=True, prof_ops=[])
    shardspeed.comm.reset_log()
    work = dist.all_reduce(t, async_op=True)
    time.sleep(0.2)
    before_wait = shardspeed.comm.get_comm_operation_count()
    work.wait()
    latency = shardspeed.comm.comms_logger.get_raw_data()["all_reduce"][32][1][0]
    shardspeed.comm.configure(enabled=False)
    return {"ops": ops, "before_wait": before_wait, "after_wait": shardspeed.comm.get_comm_operation_count(),
            "latency_ms": latency, "restored": dist.all_reduce is original}


SCENARIOS: dict[str, Callable[[], Any]] = {
    "stage2": lambda: _step(2, native=False), "stage2_native": lambda: _step(2, native=True),
    "stage3": lambda: _step(3, native=False), "stage3_native": lambda: _step(3, native=True),
    "summary": _summary, "options": _options,
}


def _job() -> dict:
    return run_named(SCENARIOS, list(SCENARIOS))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> ScenarioRuns:
    return ScenarioRuns(tmp_path_factory, "comms_logger", _job, lambda world, tmp: (), deadline=150)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("name,expected_ops", [
    ("stage2", {"all_reduce"}), ("stage2_native", {"reduce_scatter_tensor", "all_gather_into_tensor"}),
    ("stage3", {"all_reduce"}), ("stage3_native", {"reduce_scatter_tensor", "all_gather_into_tensor"}),
])
def test_logger_sees_every_collective_of_a_step(runs: ScenarioRuns, name: str, expected_ops: set) -> None:
    """Catches a collective the logger misses or counts twice, a wrong message size, or an asynchronous
    reduction or gather (ZeRO's buckets and prefetches) never timed to completion."""
    for result in runs(2, name):
        assert result["logged"] == result["seen"]
        assert expected_ops <= {op for op, _ in result["seen"]}
        assert all(result["latencies"][op] == n for op, n in Counter(op for op, _ in result["logged"].elements()).items())


@pytest.mark.timeout(200)
def test_log_summary_prints_deepspeeds_table_on_rank_zero(runs: ScenarioRuns) -> None:
    """Catches a summary that prints on every rank, loses the per-size rows, or miscomputes DeepSpeed's columns."""
    r0, r1 = runs(2, "summary")
    assert r1["text"] == ""
    lines = r0["text"].splitlines()
    assert lines[0].split() == ["Comm.", "Op", "Message", "Size", "Count", "Total", "Latency(ms)", "Avg", "Latency(ms)",
                                "tput_avg", "(Gbps)", "busbw_avg", "(Gbps)"]
    assert lines[1] == "all_reduce" and lines[2].split()[:3] == ["3.91", "KB", "3"]
    assert lines[3] == "all_gather_into_tensor" and lines[4].split()[:3] == ["3.91", "KB", "1"]
    assert "Breakdown with straggler effect" in r0["text"]
    entry = r0["summary"]["all_reduce"][4000]
    assert entry["count"] == 3 and entry["msg_size_str"] == "3.91 KB" and entry["total_latency_ms"] > 0
    assert r0["straggler"]["all_reduce"][4000]["count"] == 3
    assert r0["metadata"]["world_size"] == 2 and r1["metadata"]["rank"] == 1


@pytest.mark.timeout(200)
def test_profiling_options_keywords_and_async_timing(runs: ScenarioRuns) -> None:
    """Catches prof_ops ignored, DeepSpeed's log_name/prof keywords refused, an asynchronous collective
    timed at launch rather than at its wait, or torch.distributed left wrapped after disabling."""
    for result in runs(2, "options"):
        assert result["ops"] == ["broadcast", "my_sum"]
        assert result["before_wait"] == 0 and result["after_wait"] == 1
        assert result["latency_ms"] >= 200
        assert result["restored"]
