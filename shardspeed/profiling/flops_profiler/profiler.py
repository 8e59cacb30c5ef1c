"""DeepSpeed's FLOPs profiler (`deepspeed.profiling.flops_profiler`): `FlopsProfiler` and `get_model_profile`.

It measures a model's forward passes: parameters, MACs and FLOPs per module (counted as
`counting` describes), and each module's forward latency. Used alone:

    prof = FlopsProfiler(model)
    prof.start_profile()
    model(batch)
    prof.print_model_profile()       # or get_total_flops(), get_total_macs(), get_total_params(), ...
    prof.end_profile()

or `get_model_profile(model, args=[batch])`. With the `flops_profiler` config section the engine
profiles one optimizer step itself (`step_profile`) and prints the step's achieved FLOP rate as well.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .counting import ForwardCounting
from .report import (ModuleProfile, aggregated_lines, build_tree, duration_to_string, flops_to_string, macs_to_string,
                     number_to_string, params_to_string, tree_lines)

RULE = "-" * 78


class ProfiledEngine(Protocol):
    """What the profile summary reads from an engine."""

    world_size: int
    dp_world_size: int

    @property
    def mp_world_size(self) -> int: ...

    def train_micro_batch_size_per_gpu(self) -> int: ...


class FlopsProfiler:
    """Measures the forward passes between `start_profile()` and `stop_profile()`; the numbers stay
    readable until `end_profile()`. `ds_engine` adds the layout to the printed summary, and
    `recompute_fwd_factor` the forward recomputed by activation checkpointing (0 to 1) to the step's FLOPs."""

    def __init__(self, model: torch.nn.Module, ds_engine: ProfiledEngine | None = None,
                 recompute_fwd_factor: float = 0.0) -> None:
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = recompute_fwd_factor
        self.started = False
        self._counting: ForwardCounting | None = None
        self.iteration: tuple[float, int] | None = None  # (seconds, micro batches) of a whole step, set by the engine

    # ---- DeepSpeed's life cycle ------------------------------------------------------------------
    def start_profile(self, ignore_list: Sequence[type] | None = None) -> None:
        """Start counting (from zero) the model's forward passes; modules of the types in `ignore_list`
        and everything inside them are not counted."""
        self.stop_profile()
        self._counting = ForwardCounting(self.model, tuple(ignore_list or ()))
        self._counting.start()
        self.started = True

    def resume_profile(self) -> None:
        """Count further forward passes into the same totals (the engine: every micro batch of a step)."""
        if self._counting is None:
            self.start_profile()
        else:
            self._counting.start()

    def stop_profile(self) -> None:
        """Stop counting; the totals stay readable."""
        if self._counting is not None:
            self._counting.stop()

    def reset_profile(self) -> None:
        if self._counting is not None:
            self._counting.reset()

    def end_profile(self) -> None:
        """Stop and forget the totals."""
        self.stop_profile()
        self._counting = None
        self.started = False
        self.iteration = None

    # ---- totals ----------------------------------------------------------------------------------
    def profile(self) -> ModuleProfile:
        """The module tree with each module's totals (see `report.ModuleProfile`)."""
        if self._counting is None:
            raise RuntimeError("FlopsProfiler: nothing profiled; call start_profile() and run a forward pass first")
        return build_tree(self.model, self._counting.counter.stats)

    def _total(self, name: str, to_string: Callable[[Any], str], as_string: bool) -> Any:
        value = getattr(self.profile(), name)
        return to_string(value) if as_string else value

    def get_total_flops(self, as_string: bool = False) -> int | str:
        return self._total("flops", number_to_string, as_string)

    def get_total_macs(self, as_string: bool = False) -> int | str:
        return self._total("macs", macs_to_string, as_string)

    def get_total_duration(self, as_string: bool = False) -> float | str:
        """Seconds in the model's forward calls."""
        return self._total("duration", duration_to_string, as_string)

    def get_total_params(self, as_string: bool = False) -> int | str:
        """The parameters this rank's model holds (shared ones once; a ZeRO-3 partitioned one whole)."""
        return self._total("params", params_to_string, as_string)

    # ---- printing --------------------------------------------------------------------------------
    def print_model_profile(self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1, detailed: bool = True,
                            output_file: str | None = None) -> None:
        """Print the summary, the aggregated profile and (with `detailed`) the module tree, to stdout or `output_file`."""
        if self._counting is None:
            return
        root = self.profile()
        lines = self._summary_lines(root, profile_step)
        lines += ["", "----------------------------- Aggregated Profile per GPU -----------------------------"]
        lines += aggregated_lines(root, module_depth, top_modules)
        if detailed:
            lines += ["", "------------------------------ Detailed Profile per GPU ------------------------------",
                      "Each module profile is listed after its name in the following order: ",
                      "params, percentage of total params, MACs, percentage of total MACs, FLOPs, percentage of total "
                      "FLOPs, fwd latency, percentage of total fwd latency, fwd FLOPS",
                      "", "Note: 1. A module's own ops (run in its forward, outside its submodules: attention, residual adds) "
                      "are shown on an `(own ops)` line, so a module's children sum to it.",
                      "2. The number of floating-point operations is a count by convention (docs/observability.md), so "
                      "a FLOP rate may exceed what the hardware can do.",
                      "3. The top module's fwd latency is measured around its forward call; with an engine the step's "
                      "latencies above are measured around the engine's calls.", ""]
            lines += tree_lines(root)
        lines.append(RULE)
        _emit(lines, output_file)

    def print_model_aggregated_profile(self, module_depth: int = -1, top_modules: int = 1) -> None:
        """Print, per depth, the module classes with the most parameters, MACs and forward latency."""
        if self._counting is None:
            print("no profile: call this after start_profile() and a forward pass, before end_profile()")
            return
        _emit(aggregated_lines(self.profile(), module_depth, top_modules), None)

    def _summary_lines(self, root: ModuleProfile, profile_step: int) -> list[str]:
        line = "{:<70}  {:<8}".format
        engine = self.ds_engine
        mp = engine.mp_world_size if engine is not None else 1
        lines = ["", "-------------------------- shardspeed Flops Profiler --------------------------",
                 f"Profile Summary at step {profile_step}:",
                 "Notations:\ndata parallel size (dp_size), model parallel size(mp_size),\n"
                 "number of parameters (params), number of multiply-accumulate operations(MACs),\n"
                 "number of floating-point operations (flops), floating-point operations per second (FLOPS),\n"
                 "fwd latency (forward propagation latency), bwd latency (backward propagation latency),\n"
                 "step (weights update latency), iter latency (sum of fwd, bwd and step latency)\n"]
        if engine is not None:
            lines += [line("world size: ", engine.world_size), line("data parallel size: ", engine.dp_world_size),
                      line("model parallel size: ", mp),
                      line("batch size per GPU: ", engine.train_micro_batch_size_per_gpu())]
        fwd = root.duration
        lines += [line("params per GPU: ", params_to_string(root.params)),
                  line("params of model = params per GPU * mp_size: ", params_to_string(root.params * mp)),
                  line("fwd MACs per GPU: ", macs_to_string(root.macs)),
                  line("fwd flops per GPU: ", number_to_string(root.flops)),
                  line("fwd flops of model = fwd flops per GPU * mp_size: ", number_to_string(root.flops * mp)),
                  line("fwd latency: ", duration_to_string(fwd)),
                  line("fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ", flops_to_string(root.flops / fwd if fwd else 0))]
        if self.iteration is not None:
            lines += self._step_lines(root, line)
        return lines

    def _step_lines(self, root: ModuleProfile, line: Any) -> list[str]:
        """The whole step (every micro batch's forward, backward and the optimizer step) and its achieved rate."""
        assert self.iteration is not None
        seconds, micro_batches = self.iteration
        factor = 3 + self.recompute_fwd_factor  # forward, backward twice the forward, and the recomputed forward
        lines = [line("micro batches in the step: ", micro_batches),
                 line("bwd + step latency (the rest of the iteration): ", duration_to_string(max(seconds - root.duration, 0.0))),
                 line("iter latency: ", duration_to_string(seconds)),
                 line(f"FLOPS per GPU = {factor:g} * fwd flops per GPU / iter latency: ",
                      flops_to_string(factor * root.flops / seconds if seconds else 0))]
        if self.ds_engine is not None:
            samples = self.ds_engine.train_micro_batch_size_per_gpu() * micro_batches * self.ds_engine.dp_world_size
            lines.append(line("samples/second: ", round(samples / seconds, 2) if seconds else 0))
        return lines


def _emit(lines: list[str], output_file: str | None) -> None:
    text = "\n".join(lines) + "\n"
    if not output_file:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    folder = os.path.dirname(os.path.abspath(output_file))
    os.makedirs(folder, exist_ok=True)
    with open(output_file, "w") as f:
        f.write(text)


def get_model_profile(model: torch.nn.Module, input_shape: tuple[int, ...] | None = None, args: Sequence[Any] = (),
                      kwargs: dict[str, Any] | None = None, print_profile: bool = True, detailed: bool = True,
                      module_depth: int = -1, top_modules: int = 1, warm_up: int = 1, as_string: bool = True,
                      output_file: str | None = None, ignore_modules: Sequence[type] | None = None,
                      mode: str = "forward") -> tuple[Any, Any, Any]:
    """(flops, macs, params) of one forward pass (or `model.generate` with mode="generate") of `model`
    on `args`/`kwargs`, or on one tensor of `input_shape` (zeros of the model's dtype), after `warm_up`
    unmeasured passes. As strings, DeepSpeed's: ("7.13 M", "3.54 MMACs", "112.38 K").

    The model runs in eval mode, and is put back in the mode it was in afterwards.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"get_model_profile: model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in ("forward", "generate"):
        raise ValueError(f"get_model_profile: mode must be 'forward' or 'generate', got {mode!r}")
    kwargs = dict(kwargs or {})
    args = list(args)
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(f"get_model_profile: input_shape must be a non-empty tuple, got {input_shape!r}")
        first = next(model.parameters(), None)
        args = [torch.zeros(input_shape, dtype=first.dtype if first is not None else None,
                            device=first.device if first is not None else None)]
    if not args and not kwargs:
        raise ValueError("get_model_profile: give input_shape, args or kwargs (the model's inputs)")
    run: Callable[..., Any] = getattr(model, "generate") if mode == "generate" else model
    was_training = model.training
    model.eval()
    prof = FlopsProfiler(model)
    try:
        for _ in range(warm_up):
            run(*args, **kwargs)
        prof.start_profile(ignore_list=ignore_modules)
        run(*args, **kwargs)
        prof.stop_profile()
        root = prof.profile()
        flops, macs, params = root.flops, root.macs, root.params
        if print_profile:
            prof.print_model_profile(profile_step=warm_up, module_depth=module_depth, top_modules=top_modules,
                                     detailed=detailed, output_file=output_file)
    finally:
        prof.end_profile()
        model.train(was_training)
    if as_string:
        return number_to_string(flops), macs_to_string(macs), params_to_string(params)
    return flops, macs, params
