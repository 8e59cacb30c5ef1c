"""Wall-clock breakdown timers and the throughput timer."""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest
import torch

import shardspeed.monitor.timers as timers_mod
from shardspeed.monitor import NOOP_TIMER, ThroughputTimer, WallClockTimers
from shardspeed.monitor.timers import trimmed_mean


class FakeClock:
    """A `time` stand-in whose `perf_counter` only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0
        self.reads = 0

    def perf_counter(self) -> float:
        self.reads += 1
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1000.0


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(timers_mod, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def run_timer(timers: WallClockTimers, clock: FakeClock, name: str, ms: float) -> None:
    timers(name).start()
    clock.advance_ms(ms)
    timers(name).stop()


# ---------------------------------------------------------------- WallClockTimers


def test_measures_a_sleep() -> None:
    """Catches a unit slip (seconds or microseconds instead of ms) on the real clock."""
    timers = WallClockTimers()
    timers("sleep").start()
    time.sleep(0.02)
    timers("sleep").stop()
    # 20 ms asleep: a loaded 2-core machine can add a lot, but never remove any
    assert 15.0 <= timers("sleep").elapsed() <= 200.0


def test_elapsed_accumulates_and_resets(clock: FakeClock) -> None:
    """Catches intervals that overwrite instead of add, or a reset that forgets to clear."""
    timers = WallClockTimers()
    run_timer(timers, clock, "fwd", 10)
    run_timer(timers, clock, "fwd", 5)
    assert timers("fwd").elapsed(reset=False) == pytest.approx(15.0)
    assert timers("fwd").elapsed() == pytest.approx(15.0)
    assert timers("fwd").elapsed() == 0.0
    run_timer(timers, clock, "fwd", 3)
    timers("fwd").reset()
    assert timers("fwd").elapsed() == 0.0


def test_elapsed_on_a_running_timer_keeps_it_running(clock: FakeClock) -> None:
    """Catches a read that stops the timer or loses the interval in progress."""
    timers = WallClockTimers()
    timers("step").start()
    clock.advance_ms(4)
    assert timers("step").elapsed() == pytest.approx(4.0)
    assert timers("step").running
    clock.advance_ms(6)
    timers("step").stop()
    assert timers("step").elapsed() == pytest.approx(6.0)


def test_misuse_raises_naming_the_timer() -> None:
    """Catches nested start() calls silently restarting (and shortening) the interval."""
    timers = WallClockTimers()
    timers("bwd").start()
    with pytest.raises(RuntimeError, match="`bwd` is already running"):
        timers("bwd").start()
    timers("bwd").stop()
    with pytest.raises(RuntimeError, match="`bwd` is not running"):
        timers("bwd").stop()


def test_mean_is_trimmed(clock: FakeClock) -> None:
    """Catches one slow outlier (a GC pause, a checkpoint) dominating the mean."""
    assert trimmed_mean([1, 2, 3, 4, 5, 6, 7, 8, 9, 1000], 0.1) == pytest.approx(5.5)
    assert trimmed_mean([], 0.1) == 0.0
    timers = WallClockTimers()
    for ms in (10, 10, 10, 10, 10, 10, 10, 10, 10, 500):
        run_timer(timers, clock, "fwd", ms)
    assert timers("fwd").mean() == pytest.approx(10.0)
    assert timers.get_mean(["fwd", "never"], normalizer=2.0) == {"fwd": pytest.approx(5.0)}
    assert timers("fwd").elapsed() == 0.0  # get_mean(reset=True) cleared it


def test_log_line_format_and_return(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """Catches a changed line (people grep `time (ms)`) or a wrong normalizer."""
    timers = WallClockTimers(rank=0)
    run_timer(timers, clock, "fwd", 24.68)
    run_timer(timers, clock, "bwd", 61.0)
    with caplog.at_level(logging.INFO, logger="shardspeed"):
        result = timers.log(["fwd", "bwd", "never_started"], normalizer=2.0)
    assert [r.getMessage() for r in caplog.records] == ["time (ms) | fwd: 12.34 | bwd: 30.50"]
    assert caplog.records[0].name == "shardspeed"
    assert result == {"fwd": pytest.approx(12.34), "bwd": pytest.approx(30.5)}
    assert timers.log(["fwd"], reset=False) == {"fwd": 0.0}  # the first log reset them


def test_log_ranks(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """Catches every rank printing by default, and a rank that skips the reset when silent."""
    timers = WallClockTimers(rank=1)
    with caplog.at_level(logging.INFO, logger="shardspeed"):
        run_timer(timers, clock, "fwd", 1)
        assert timers.log(["fwd"]) == {"fwd": pytest.approx(1.0)}
        assert timers("fwd").elapsed() == 0.0
        run_timer(timers, clock, "fwd", 1)
        timers.log(["fwd"], ranks=[1])
        run_timer(timers, clock, "fwd", 1)
        timers.log(["fwd"], ranks=[-1])
    assert len(caplog.records) == 2


def test_log_rejects_bad_normalizer() -> None:
    with pytest.raises(ValueError, match="normalizer must be positive"):
        WallClockTimers().log(["fwd"], normalizer=0.0)


def test_log_memory_breakdown_on_cpu(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """Catches the memory suffix crashing on a machine without CUDA."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU (resident memory) suffix")
    timers = WallClockTimers(rank=0)
    run_timer(timers, clock, "fwd", 1)
    with caplog.at_level(logging.INFO, logger="shardspeed"):
        timers.log(["fwd"], memory_breakdown=True)
    assert caplog.records[0].getMessage().startswith("time (ms) | fwd: 1.00 | rss: ")


def test_disabled_timers_do_nothing(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """Catches `wall_clock_breakdown: false` still reading clocks or syncing the device."""
    timers = WallClockTimers(enabled=False)
    assert timers("fwd") is NOOP_TIMER and timers("bwd") is NOOP_TIMER
    timers("fwd").start()
    timers("fwd").start()  # no bookkeeping, so no misuse error either
    timers("fwd").stop()
    assert timers("fwd").elapsed() == 0.0 and timers("fwd").mean() == 0.0
    with caplog.at_level(logging.INFO, logger="shardspeed"):
        assert timers.log(["fwd"]) == {}
    assert caplog.records == []
    assert clock.reads == 0
    assert timers.get_timers() == {}


def test_device_sync_guarded_by_cuda_availability(monkeypatch: pytest.MonkeyPatch, clock: FakeClock) -> None:
    """Catches a missing sync on CUDA (timing kernel launches only) or a sync call on CPU."""
    calls: list[int] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run_timer(WallClockTimers(), clock, "fwd", 1)
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    run_timer(WallClockTimers(), clock, "fwd", 1)
    assert len(calls) == 2  # once before each clock read
    run_timer(WallClockTimers(synchronize=False), clock, "fwd", 1)
    assert len(calls) == 2


# ---------------------------------------------------------------- ThroughputTimer


def micro_step(tput: ThroughputTimer, clock: FakeClock, ms: float, boundary: bool, report: bool = True) -> None:
    tput.start()
    clock.advance_ms(ms)
    tput.stop(global_step=boundary, report_speed=report)


def test_throughput_skips_warmup_steps(clock: FakeClock) -> None:
    """Catches slow warm-up steps (allocation, compilation) dragging the average down."""
    tput = ThroughputTimer(batch_size=8, steps_per_output=None)
    assert tput.avg_samples_per_sec() == 0.0
    for _ in range(2):
        micro_step(tput, clock, 10_000, True)  # warm-up: ignored
    assert tput.avg_samples_per_sec() == 0.0
    for _ in range(3):
        micro_step(tput, clock, 500, True)
    assert tput.global_step_count == 5
    assert tput.avg_samples_per_sec() == pytest.approx(16.0)


def test_throughput_sums_micro_steps_of_an_optimizer_step(clock: FakeClock) -> None:
    """Catches gradient accumulation counted as one micro step's time per optimizer step."""
    tput = ThroughputTimer(batch_size=8, steps_per_output=None, start_step=0)
    for _ in range(2):
        micro_step(tput, clock, 250, False)
        micro_step(tput, clock, 250, True)
    assert (tput.micro_step_count, tput.global_step_count) == (4, 2)
    assert tput.avg_samples_per_sec() == pytest.approx(16.0)


def test_throughput_report_line(clock: FakeClock) -> None:
    """Catches a missing or reformatted report (log parsers match these keys)."""
    lines: list[str] = []
    tput = ThroughputTimer(batch_size=8, steps_per_output=2, start_step=1, log_fn=lines.append)
    micro_step(tput, clock, 9_000, True)  # warm-up
    micro_step(tput, clock, 500, True)
    micro_step(tput, clock, 250, True, report=False)
    tput.update_epoch_count()
    micro_step(tput, clock, 250, True)
    if torch.cuda.is_available():
        pytest.skip("the CPU line has no memory fields")
    assert lines == [
        "epoch=0/micro_step=2/global_step=2, RunningAvgSamplesPerSec=16.000, CurrSamplesPerSec=16.000",
        "epoch=1/micro_step=1/global_step=4, RunningAvgSamplesPerSec=24.000, CurrSamplesPerSec=32.000",
    ]


def test_throughput_disabled_and_unstarted(clock: FakeClock) -> None:
    """Catches `timers.throughput.enabled: false` still counting, or a stray stop() crashing."""
    off = ThroughputTimer(batch_size=8, steps_per_output=1, enabled=False, log_fn=pytest.fail)
    micro_step(off, clock, 10, True)
    assert off.global_step_count == 0 and off.avg_samples_per_sec() == 0.0
    assert clock.reads == 0
    on = ThroughputTimer(batch_size=8, steps_per_output=None)
    on.stop(global_step=True)  # never started: ignored, like DeepSpeed
    assert on.global_step_count == 0


def test_throughput_real_clock() -> None:
    """Catches a unit slip on the real clock: 1 sample per ~20 ms is ~50 samples/s."""
    tput = ThroughputTimer(batch_size=1, steps_per_output=None, start_step=0)
    for _ in range(2):
        tput.start()
        time.sleep(0.02)
        tput.stop(global_step=True)
    # each step took between 15 and 200 ms (noisy machine): 5 to ~67 samples/s
    assert 5.0 <= tput.avg_samples_per_sec() <= 1000.0 / 15.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0, "steps_per_output": None}, "batch_size must be positive"),
        ({"batch_size": 4, "steps_per_output": 0}, "steps_per_print must be a positive integer"),
        ({"batch_size": 4, "steps_per_output": None, "start_step": -1}, "start_step"),
    ],
)
def test_throughput_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ThroughputTimer(**kwargs)
