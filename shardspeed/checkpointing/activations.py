"""DeepSpeed's activation checkpointing API (`deepspeed.checkpointing`) on PyTorch's own machinery.

`checkpoint(function, *args, **kwargs)` runs `function` keeping only its inputs; the backward pass
runs it again (the *recompute*) to get the activations it needs. The settings come from
`configure(mpu, deepspeed_config=..., <overrides>)`, whose explicit arguments win over the
config's `activation_checkpointing` section, as in DeepSpeed.

Why `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` underneath, rather than a
reentrant `autograd.Function` like DeepSpeed's `CheckpointFunction`:

- It already does what DeepSpeed copies from it: saves the CPU RNG state and the device RNG states
  at forward time and restores them for the recompute (identical dropout masks), replays autocast,
  and checks that the recompute saved the same tensors as the forward.
- It is correct where the reentrant form is not: parameters get gradients when no input requires
  grad, `torch.autograd.grad` works, checkpoints nest, and the forward runs with grad enabled, as
  an unchecked forward does. Its `early_stop` ends the recompute once the needed tensors exist.
- Everything DeepSpeed adds fits its two extension points. `context_fn` gives a context entered
  around each recompute: there the Megatron RNG tracker's states are swapped to their forward-time
  snapshot (and back), the recompute is timed (`profile`), and the device synchronized
  (`synchronize_checkpoint_boundary`). The inputs it saves are ordinary autograd saved tensors, so
  a `saved_tensors_hooks` context around the call shards them across the tensor-parallel group
  (`partition_activations`) and/or keeps them in host memory (`cpu_checkpointing`): see
  `saved_inputs.py`. Keyword arguments are folded into the positional ones (as DeepSpeed does) so
  that their tensors are saved, and sharded or offloaded, like the rest.

`contiguous_memory_optimization` / `number_checkpoints` are accepted with DeepSpeed's rules
(contiguous needs `partition_activations` and `number_checkpoints`) and have no effect: they copy
checkpoints into preallocated buffers to fight CUDA allocator fragmentation, which PyTorch's
expandable segments (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`) address without copies,
and which does not arise on CPU.

Process-wide state: DeepSpeed's API is module-level by contract (`configure` once, `checkpoint`
anywhere in model code), so this module holds one `ActivationCheckpointer` and the `mpu` it was
given. Code that prefers to pass things in can build its own `ActivationCheckpointer(settings, tp)`.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from types import TracebackType
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..accelerator import get_accelerator
from ..config import ConfigError, ShardspeedConfig, lift_autos, parse_config, read_config
from ..config.sections import ActivationCheckpointingConfig
from .rng import (
    MODEL_PARALLEL_RNG_TRACKER_NAME,
    RNGStatesTracker,
    device_manual_seed,
    get_cuda_rng_tracker,
)
from .saved_inputs import InputStash, SavedInputStats, TensorParallelGroup

logger = logging.getLogger("shardspeed")

MAX_TIMINGS = 100_000  # profile records kept (oldest dropped), so a long run cannot grow without bound
_SEED_OFFSET = 2718  # Megatron's and DeepSpeed's offset of the model-parallel seed


@dataclass(frozen=True)
class CheckpointSettings:
    """The `activation_checkpointing` section, as the checkpointer uses it (DeepSpeed's key names)."""

    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    cpu_checkpointing: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False

    @classmethod
    def from_section(cls, section: ActivationCheckpointingConfig) -> "CheckpointSettings":
        return cls(**{f.name: getattr(section, f.name) for f in fields(cls)})

    def validate(self) -> None:
        """DeepSpeed's rules for the combination, as errors naming the key."""
        if self.number_checkpoints is not None and self.number_checkpoints <= 0:
            raise ConfigError(f"`activation_checkpointing.number_checkpoints` must be positive, got {self.number_checkpoints}")
        if self.contiguous_memory_optimization and not self.partition_activations:
            raise ConfigError("`activation_checkpointing.contiguous_memory_optimization` needs "
                              "`partition_activations: true` (as in DeepSpeed); enable it or drop contiguous_memory_optimization")
        if self.contiguous_memory_optimization and self.number_checkpoints is None:
            raise ConfigError("`activation_checkpointing.contiguous_memory_optimization` needs `number_checkpoints` "
                              "(configure(num_checkpoints=...)); set it to the number of checkpoints per forward")


@dataclass(frozen=True)
class CheckpointTiming:
    """One `profile` record: checkpoint call `index` (counted since `reset()`) took `ms` in `phase`."""

    index: int
    phase: Literal["forward", "recompute"]
    ms: float


class _RecomputeContext:
    """Entered around each recompute of one checkpoint (re-entrant: a graph may be backwarded twice).

    Swaps the RNG tracker to its forward-time snapshot and back; times and synchronizes as set.
    """

    def __init__(self, owner: "ActivationCheckpointer", index: int, tracker_states: dict[str, torch.Tensor]) -> None:
        self.owner, self.index, self.tracker_states = owner, index, tracker_states
        self._saved: list[tuple[dict[str, torch.Tensor], float]] = []

    def __enter__(self) -> None:
        owner = self.owner
        owner.boundary()
        # A copy: fork() stores its advanced state into the dict it is given.
        self._saved.append((owner.tracker.get_states(), owner.clock()))
        owner.tracker.set_states(copy.copy(self.tracker_states))

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        states, start = self._saved.pop()
        self.owner.tracker.set_states(states)
        self.owner.record(self.index, "recompute", start)
        self.owner.boundary()


class ActivationCheckpointer:
    """Checkpoints functions with one set of settings over one tensor-parallel group."""

    def __init__(self, settings: CheckpointSettings | None = None, tp: TensorParallelGroup | None = None,
                 tracker: RNGStatesTracker | None = None) -> None:
        self.settings = settings or CheckpointSettings()
        self.settings.validate()
        self.tp = tp or TensorParallelGroup()
        self.tracker = tracker or get_cuda_rng_tracker()
        self.stats = SavedInputStats()
        self.timings: deque[CheckpointTiming] = deque(maxlen=MAX_TIMINGS)
        self.calls = 0

    def checkpoint(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`function(*args, **kwargs)`, keeping only the inputs for backward; returns its outputs as they are."""
        if kwargs:
            function, args = _fold_kwargs(function, args, kwargs)
        index = self.calls
        self.calls += 1
        s = self.settings
        stash = InputStash(self.tp, s.partition_activations, s.cpu_checkpointing, self.stats)
        self.boundary()
        start = self.clock()
        with stash.hooks() if stash.active else contextlib.nullcontext():
            out = torch_checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True,
                                   context_fn=lambda: (contextlib.nullcontext(), self._recompute_context(index)))
        self.record(index, "forward", start)
        self.boundary()
        return out

    def _recompute_context(self, index: int) -> _RecomputeContext:
        # Called by torch at the start of the forward: the tracker's states now are what the recompute needs.
        return _RecomputeContext(self, index, self.tracker.get_states())

    def boundary(self) -> None:
        """`synchronize_checkpoint_boundary`: wait for the device at each checkpoint's start and end."""
        if self.settings.synchronize_checkpoint_boundary:
            get_accelerator().synchronize()

    def clock(self) -> float:
        """Seconds, after a device sync when profiling (else the clock would time kernel launches)."""
        if not self.settings.profile:
            return 0.0
        get_accelerator().synchronize()
        return time.perf_counter()

    def record(self, index: int, phase: Literal["forward", "recompute"], start: float) -> None:
        if not self.settings.profile:
            return
        timing = CheckpointTiming(index, phase, (self.clock() - start) * 1e3)
        self.timings.append(timing)
        if _rank() == 0:
            logger.info("%s activation checkpoint %d %s: %.3f ms", _prefix(self.tp), index, phase, timing.ms)

    def reset(self) -> None:
        """Forget timings and saved-input statistics, and restart the call count."""
        self.stats = SavedInputStats()
        self.timings.clear()
        self.calls = 0


def _fold_kwargs(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> tuple[Callable[..., Any], tuple]:
    """`function` taking the keyword arguments' values as extra positionals, and those positionals."""
    keys, count = tuple(kwargs), len(args)

    def call(*all_args: Any) -> Any:
        return function(*all_args[:count], **dict(zip(keys, all_args[count:])))

    return call, (*args, *kwargs.values())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _prefix(tp: TensorParallelGroup) -> str:
    return f"[rank {_rank()} | tp={tp.size}]"


# ---- DeepSpeed's module-level API ----------------------------------------------------------------

_checkpointer = ActivationCheckpointer()
_mpu: Any = None
_configured = False


def configure(
    mpu_: Any,
    deepspeed_config: dict[str, Any] | str | os.PathLike[str] | ShardspeedConfig | ActivationCheckpointingConfig | None = None,
    partition_activations: bool | None = None,
    contiguous_checkpointing: bool | None = None,
    num_checkpoints: int | None = None,
    checkpoint_in_cpu: bool | None = None,
    synchronize: bool | None = None,
    profile: bool | None = None,
) -> None:
    """Set how `checkpoint` works: defaults, then the config's section, then the explicit arguments.

    `mpu_`: a Megatron-style model-parallel unit (`get_[tensor_]model_parallel_{rank,world_size,group}`);
    None keeps the one given before, as DeepSpeed does. `deepspeed_config`: a ds_config (dict, path,
    JSON string or parsed `ShardspeedConfig`), validated as `initialize` validates it. A bad value or
    combination raises `ConfigError` and leaves the previous configuration in place.
    """
    global _checkpointer, _mpu, _configured
    settings = CheckpointSettings()
    if deepspeed_config is not None:
        settings = CheckpointSettings.from_section(_section(deepspeed_config))
    overrides: dict[str, Any] = {  # one value per settings field, each of its own type
        "partition_activations": partition_activations, "contiguous_memory_optimization": contiguous_checkpointing,
        "number_checkpoints": num_checkpoints, "cpu_checkpointing": checkpoint_in_cpu,
        "synchronize_checkpoint_boundary": synchronize, "profile": profile,
    }
    settings = replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    mpu = mpu_ if mpu_ is not None else _mpu
    checkpointer = ActivationCheckpointer(settings, TensorParallelGroup.from_mpu(mpu))
    _checkpointer, _mpu, _configured = checkpointer, mpu, True
    if _rank() == 0:
        logger.info("%s activation checkpointing: %s", _prefix(checkpointer.tp),
                    ", ".join(f"{f.name}={getattr(settings, f.name)}" for f in fields(settings)))


def _section(config: Any) -> ActivationCheckpointingConfig:
    if isinstance(config, ActivationCheckpointingConfig):
        return config
    if isinstance(config, ShardspeedConfig):
        return config.activation_checkpointing
    raw = read_config(config)
    autos = sorted(k for k in lift_autos(raw) if k.startswith("activation_checkpointing."))
    if autos:
        raise ConfigError(f'config keys {", ".join(f"`{k}`" for k in autos)} are "auto"; write true/false or a number')
    return parse_config(raw).activation_checkpointing


@torch.compiler.disable  # a graph break, as in DeepSpeed: compiled callers run the checkpoint eagerly
def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `function(*args, **kwargs)` keeping only its inputs; recompute it in the backward pass.

    Outputs are returned as `function` returns them. Works unconfigured, with the defaults.
    """
    return _checkpointer.checkpoint(function, *args, **kwargs)


non_reentrant_checkpoint = checkpoint  # DeepSpeed's name for the non-reentrant variant; this one is non-reentrant


def is_configured() -> bool:
    """True once `configure()` has been called (DeepSpeed's meaning)."""
    return _configured


def reset() -> None:
    """DeepSpeed calls this between forwards without backward (evaluation) to drop contiguous buffers.

    There are none here; it forgets the profile timings and saved-input statistics.
    """
    _checkpointer.reset()


def unconfigure() -> None:
    """Back to the state before any `configure()`: defaults, no mpu, `is_configured()` False."""
    global _checkpointer, _mpu, _configured
    _checkpointer, _mpu, _configured = ActivationCheckpointer(), None, False


def settings() -> CheckpointSettings:
    """The settings `checkpoint` uses now."""
    return _checkpointer.settings


def get_timings() -> list[CheckpointTiming]:
    """`profile` records since the last `reset()`: a forward and (after backward) a recompute per call."""
    return list(_checkpointer.timings)


def saved_input_stats() -> SavedInputStats:
    """Bytes of checkpoint inputs kept (and what keeping them whole would cost) since the last `reset()`.

    Counted when `partition_activations` (with tp > 1) or `cpu_checkpointing` is on.
    """
    return _checkpointer.stats.snapshot()


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """DeepSpeed's setter for `partition_activations` alone."""
    _replace_settings(partition_activations=partition_activation)


def set_num_layers(nlayers: int | None) -> None:
    """DeepSpeed's setter for `number_checkpoints` alone."""
    _replace_settings(number_checkpoints=nlayers)


def _replace_settings(**changes: Any) -> None:
    global _checkpointer
    old = _checkpointer
    _checkpointer = ActivationCheckpointer(replace(old.settings, **changes), old.tp, old.tracker)


def _tp_rank(mpu: Any) -> int:
    """DeepSpeed's `bwc_tensor_model_parallel_rank`: tensor-parallel rank, 0 without an mpu."""
    if mpu is None:
        return 0
    if hasattr(mpu, "get_tensor_model_parallel_rank"):
        return int(mpu.get_tensor_model_parallel_rank())
    if hasattr(mpu, "get_slice_parallel_rank"):
        return int(mpu.get_slice_parallel_rank())
    return int(mpu.get_model_parallel_rank())


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the device generator with `seed` (same on every rank) and track a model-parallel state.

    The tracked state `model-parallel-rng` gets `seed + 2718 + tensor-parallel rank`: different on
    each rank of a tensor-parallel group, the same across data-parallel replicas. Uses the mpu given
    to `configure` (none: tensor-parallel rank 0). Replaces `torch.cuda.manual_seed` for model code.
    """
    tp_rank = _tp_rank(_mpu)
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    device_manual_seed(seed)
    tracker.add(MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _SEED_OFFSET + tp_rank)
    if _rank() == 0:
        logger.info("%s model-parallel seed %d, data-parallel seed %d", _prefix(_checkpointer.tp),
                    seed + _SEED_OFFSET + tp_rank, seed)


def model_parallel_reconfigure_tp_seed(seed: int) -> None:
    """Reseed the tracked model-parallel state with `seed + 2718 + tensor-parallel rank`."""
    with get_cuda_rng_tracker().fork():
        device_manual_seed(seed + _SEED_OFFSET + _tp_rank(_mpu))
