"""The `flops_profiler` config section at work in the engine: one optimizer step profiled on rank 0.

The engine runs each forward pass inside `forward()` and calls `after_model_step()` once it has
taken an optimizer step. When `engine.global_steps == profile_step` (DeepSpeed's rule: with
the default 1, the second optimizer step, after one warm-up step), every forward pass of that step's
micro batches is counted into one profile, the whole iteration is timed from its first forward to the
end of its optimizer step, and the profile is printed (stdout, or `output_file`) with the step's
achieved FLOP rate: (3 + recompute_fwd_factor) x forward FLOPs / iteration latency.

DeepSpeed instead resets the profile at every forward of the step and prints at every `engine.step()`
call of it, so with gradient accumulation it prints once per micro batch, each time for one micro batch.
"""
from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

from ...accelerator import get_accelerator
from ...comm.topology import Axis, Topology
from ...config import ConfigError
from ...config.sections import FlopsProfilerConfig
from .profiler import FlopsProfiler


class Engine(Protocol):
    module: torch.nn.Module
    topology: Topology
    global_steps: int
    _is_pipeline: bool

    @property
    def global_rank(self) -> int: ...

    @property
    def world_size(self) -> int: ...

    def train_micro_batch_size_per_gpu(self) -> int: ...


class _Layout:
    """The engine's layout as the profile summary names it (DeepSpeed's engine attributes)."""

    def __init__(self, engine: Engine) -> None:
        self.world_size = engine.world_size
        self.dp_world_size = engine.topology.axis(Axis.DATA).size
        self.mp_world_size = engine.topology.axis(Axis.TENSOR).size
        self.micro_batch = engine.train_micro_batch_size_per_gpu()

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.micro_batch


class StepProfile:
    """Profiles the `profile_step`-th optimizer step of `engine` on global rank 0 (see the module
    docstring); does nothing when the section is off. It holds the engine weakly (the engine holds it)."""

    def __init__(self, engine: Engine, config: FlopsProfilerConfig) -> None:
        self.config = config
        self.enabled = config.enabled
        if self.enabled and engine._is_pipeline:
            raise ConfigError("`flops_profiler.enabled` is not supported with a PipelineModule yet (train_batch runs the "
                              "stages itself); profile a stage with shardspeed.profiling.flops_profiler.FlopsProfiler")
        self._engine = weakref.ref(engine)
        self.profiler = FlopsProfiler(engine.module, recompute_fwd_factor=config.recompute_fwd_factor)
        self._started: float | None = None  # the clock at the profiled step's first forward
        self._micro_batches = 0
        self.done = False

    def _due(self) -> bool:
        engine = self._engine()
        return (self.enabled and not self.done and engine is not None and engine.global_steps == self.config.profile_step
                and engine.global_rank == 0)

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Around one forward pass of the engine: counted when it belongs to the profiled step."""
        if not self._due():
            yield
            return
        if self._started is None:
            self._started = _clock()
            self.profiler.start_profile()
        else:
            self.profiler.resume_profile()
        self._micro_batches += 1
        try:
            yield
        finally:
            self.profiler.stop_profile()

    def after_model_step(self) -> None:
        """The optimizer step was taken: if it was the profiled one, print its profile."""
        engine = self._engine()
        if self._started is None or engine is None:
            return
        self.profiler.iteration = (_clock() - self._started, self._micro_batches)
        self.profiler.ds_engine = _Layout(engine)
        cfg = self.config
        self.profiler.print_model_profile(profile_step=cfg.profile_step, module_depth=cfg.module_depth,
                                          top_modules=cfg.top_modules, detailed=cfg.detailed, output_file=cfg.output_file)
        self.profiler.end_profile()
        self._started, self.done = None, True


def _clock() -> float:
    get_accelerator().synchronize()
    return time.perf_counter()
