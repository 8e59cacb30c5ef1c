"""Wall-clock timers for `wall_clock_breakdown` and the samples-per-second throughput timer.

`WallClockTimers` is a registry of named stopwatches: `timers("fwd").start()` ...
`timers("fwd").stop()`, then `timers.log(["fwd", "bwd"])` prints
`time (ms) | fwd: 12.34 | bwd: 56.78` through the `shardspeed` logger. All times are in
milliseconds. When CUDA is available the device is synchronized before each clock read, so a
timer measures the kernels it brackets, not just their launch; on CPU nothing is synchronized.
A disabled registry (`wall_clock_breakdown: false`) hands out one shared no-op timer, so the
engine may call its timers unconditionally.

`ThroughputTimer` brackets each micro step and reports samples per second, leaving the first
`start_step` optimizer steps (warm-up: allocator growth, autotuning, compilation) out of the
average, as DeepSpeed does.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

logger = logging.getLogger("shardspeed")

# DeepSpeed's timer names, so `wall_clock_breakdown` lines read the same.
FORWARD_MICRO_TIMER = "fwd_microstep"
FORWARD_GLOBAL_TIMER = "fwd"
BACKWARD_MICRO_TIMER = "bwd_microstep"
BACKWARD_GLOBAL_TIMER = "bwd"
BACKWARD_INNER_MICRO_TIMER = "bwd_inner_microstep"
BACKWARD_INNER_GLOBAL_TIMER = "bwd_inner"
BACKWARD_REDUCE_MICRO_TIMER = "bwd_allreduce_microstep"
BACKWARD_REDUCE_GLOBAL_TIMER = "bwd_allreduce"
STEP_MICRO_TIMER = "step_microstep"
STEP_GLOBAL_TIMER = "step"

_GIB = float(1 << 30)


def _device_sync(synchronize: bool | None) -> Callable[[], None] | None:
    """`torch.cuda.synchronize` when asked (None: when CUDA is available), else None."""
    if synchronize is None:
        synchronize = torch.cuda.is_available()
    return torch.cuda.synchronize if synchronize else None


def trimmed_mean(values: Sequence[float], trim: float = 0.1) -> float:
    """Mean of `values` without the lowest and highest `trim` fraction; 0.0 when empty."""
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    data = sorted(values)
    cut = int(round(len(data) * trim))
    kept = data[cut : len(data) - cut]
    return sum(kept) / len(kept) if kept else 0.0


class Timer:
    """A named stopwatch that accumulates the intervals between `start()` and `stop()`."""

    __slots__ = ("name", "_sync", "_started_at", "_intervals_ms")

    def __init__(self, name: str, sync: Callable[[], None] | None = None) -> None:
        self.name = name
        self._sync = sync
        self._started_at: float | None = None
        self._intervals_ms: list[float] = []

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def start(self) -> None:
        """Begin an interval; raises RuntimeError if one is already running."""
        if self._started_at is not None:
            raise RuntimeError(f"timer `{self.name}` is already running; stop() it before start()")
        self._started_at = self._now()

    def stop(self) -> None:
        """End the running interval and record it; raises RuntimeError if none is running."""
        if self._started_at is None:
            raise RuntimeError(f"timer `{self.name}` is not running; start() it before stop()")
        self._intervals_ms.append((self._now() - self._started_at) * 1000.0)
        self._started_at = None

    def reset(self) -> None:
        """Forget every recorded interval and any running one."""
        self._started_at = None
        self._intervals_ms.clear()

    def elapsed(self, reset: bool = True) -> float:
        """Total recorded milliseconds, including the running interval up to now.

        A running timer keeps running (its interval so far is recorded and a new one starts).
        With `reset`, the recorded intervals are forgotten after reading.
        """
        was_running = self.running
        if was_running:
            self.stop()
        total = sum(self._intervals_ms)
        if reset:
            self._intervals_ms.clear()
        if was_running:
            self.start()
        return total

    def mean(self) -> float:
        """Trimmed mean (10 % off each end) of the completed intervals, in milliseconds."""
        return trimmed_mean(self._intervals_ms, 0.1)


class NoopTimer:
    """What a disabled registry hands out: every method returns at once."""

    __slots__ = ()
    name = "noop"
    running = False

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def elapsed(self, reset: bool = True) -> float:
        return 0.0

    def mean(self) -> float:
        return 0.0


NOOP_TIMER = NoopTimer()


def _current_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def memory_summary() -> str:
    """` | mem_allocated: ... GB | ...` on CUDA; the process's resident memory on CPU."""
    if torch.cuda.is_available():
        c = torch.cuda
        return (
            f" | mem_allocated: {c.memory_allocated() / _GIB:.4f} GB"
            f" | max_mem_allocated: {c.max_memory_allocated() / _GIB:.4f} GB"
            f" | cache_allocated: {c.memory_reserved() / _GIB:.4f} GB"
            f" | max_cache_allocated: {c.max_memory_reserved() / _GIB:.4f} GB"
        )
    import psutil

    return f" | rss: {psutil.Process().memory_info().rss / _GIB:.4f} GB"


class WallClockTimers:
    """Named timers for `wall_clock_breakdown`, logged as one `time (ms) | name: ms` line.

    `rank` is the global rank used to pick who prints; None asks `torch.distributed` (0 when it
    is not initialized). `synchronize` None means "when CUDA is available".
    """

    def __init__(self, enabled: bool = True, *, synchronize: bool | None = None, rank: int | None = None) -> None:
        self.enabled = enabled
        self._sync = _device_sync(synchronize) if enabled else None
        self._rank = rank
        self._timers: dict[str, Timer] = {}

    def __call__(self, name: str) -> Timer | NoopTimer:
        """The timer called `name`, created on first use (the shared no-op one when disabled)."""
        if not self.enabled:
            return NOOP_TIMER
        timer = self._timers.get(name)
        if timer is None:
            timer = self._timers[name] = Timer(name, self._sync)
        return timer

    def get_timers(self) -> dict[str, Timer]:
        """Every timer created so far, by name."""
        return dict(self._timers)

    def _read(self, names: Sequence[str], normalizer: float, read: Callable[[Timer], float]) -> dict[str, float]:
        if normalizer <= 0:
            raise ValueError(f"normalizer must be positive, got {normalizer}")
        return {n: read(self._timers[n]) / normalizer for n in names if n in self._timers}

    def log(
        self,
        names: Sequence[str],
        normalizer: float = 1.0,
        reset: bool = True,
        ranks: Sequence[int] | None = None,
        memory_breakdown: bool = False,
    ) -> dict[str, float]:
        """Log `time (ms) | a: 1.23 | b: 4.56` at INFO and return `{name: ms / normalizer}`.

        Timers never started are left out. Every rank reads (and with `reset`, clears) its
        timers; only the ranks in `ranks` (default `[0]`; `-1` means all) print the line.
        """
        times = self._read(names, normalizer, lambda t: t.elapsed(reset=reset))
        if not times:
            return times
        wanted = (0,) if ranks is None else tuple(ranks)
        rank = self._rank if self._rank is not None else _current_rank()
        if -1 in wanted or rank in wanted:
            line = "time (ms)" + "".join(f" | {n}: {ms:.2f}" for n, ms in times.items())
            logger.info(line + (memory_summary() if memory_breakdown else ""))
        return times

    def get_mean(self, names: Sequence[str], normalizer: float = 1.0, reset: bool = True) -> dict[str, float]:
        """`{name: trimmed-mean interval in ms / normalizer}`; with `reset`, clears those timers."""
        means = self._read(names, normalizer, lambda t: t.mean())
        if reset:
            for name in means:
                self._timers[name].reset()
        return means


class ThroughputTimer:
    """Samples per second over optimizer steps, leaving the first `start_step` steps out.

    Call `start()` before each micro step's forward and `stop(global_step=...)` after it, with
    `global_step=True` on the micro step that ends an optimizer step. `batch_size` is the number
    of samples per optimizer step (DeepSpeed passes `train_batch_size`). Every
    `steps_per_output` optimizer steps (None: never) `stop` logs
    `epoch=E/micro_step=M/global_step=G, RunningAvgSamplesPerSec=..., CurrSamplesPerSec=...`
    (plus `MemAllocated`/`MaxMemAllocated` in GB on CUDA) through `log_fn` (default: INFO on
    the `shardspeed` logger).
    """

    def __init__(
        self,
        batch_size: int,
        steps_per_output: int | None,
        *,
        start_step: int = 2,
        enabled: bool = True,
        synchronize: bool | None = None,
        log_fn: Callable[[str], None] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"ThroughputTimer batch_size must be positive, got {batch_size}")
        if steps_per_output is not None and steps_per_output <= 0:
            raise ValueError(f"steps_per_print must be a positive integer or None, got {steps_per_output}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.batch_size = batch_size
        self.steps_per_output = steps_per_output
        self.start_step = start_step
        self.enabled = enabled
        self._sync = _device_sync(synchronize) if enabled else None
        self._log = log_fn if log_fn is not None else logger.info
        self.epoch_count = 0
        self.micro_step_count = 0
        self.global_step_count = 0
        self._running = False
        self._started_at: float | None = None
        self._timed = False  # whether the current micro step is measured (past warm-up)
        self._step_seconds = 0.0  # measured time of the optimizer step in progress
        self._total_seconds = 0.0  # measured time of all counted optimizer steps
        self._timed_steps = 0

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def update_epoch_count(self) -> None:
        """Start a new epoch: the epoch counter goes up and the micro-step counter restarts."""
        self.epoch_count += 1
        self.micro_step_count = 0

    def start(self) -> None:
        """Begin a micro step (measured only once `start_step` optimizer steps are done)."""
        if not self.enabled:
            return
        self._timed = self.global_step_count >= self.start_step
        self._started_at = self._now() if self._timed else None
        self._running = True

    def stop(self, global_step: bool, report_speed: bool = True) -> None:
        """End a micro step; `global_step=True` when it completed an optimizer step."""
        if not self.enabled or not self._running:
            return
        self._running = False
        self.micro_step_count += 1
        if global_step:
            self.global_step_count += 1
        if self._started_at is not None:
            self._step_seconds += self._now() - self._started_at
            self._started_at = None
        if not global_step:
            return
        if self._timed:
            self._total_seconds += self._step_seconds
            self._timed_steps += 1
            if report_speed and self._is_report_step():
                self._log(self._report(self._step_seconds))
        self._step_seconds = 0.0

    def _is_report_step(self) -> bool:
        return self.steps_per_output is not None and self.global_step_count % self.steps_per_output == 0

    def _report(self, step_seconds: float) -> str:
        current = self.batch_size / step_seconds if step_seconds > 0 else 0.0
        line = (
            f"epoch={self.epoch_count}/micro_step={self.micro_step_count}/global_step={self.global_step_count}, "
            f"RunningAvgSamplesPerSec={self.avg_samples_per_sec():.3f}, CurrSamplesPerSec={current:.3f}"
        )
        if torch.cuda.is_available():
            line += (
                f", MemAllocated={torch.cuda.memory_allocated() / _GIB:.2f}GB"
                f", MaxMemAllocated={torch.cuda.max_memory_allocated() / _GIB:.2f}GB"
            )
        return line

    def avg_samples_per_sec(self) -> float:
        """Mean samples per second over the measured optimizer steps; 0.0 before the first one."""
        if self._timed_steps == 0 or self._total_seconds <= 0:
            return 0.0
        return self.batch_size * self._timed_steps / self._total_seconds
