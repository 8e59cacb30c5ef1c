"""DeepSpeed's learning-rate schedules: same class names, parameters, defaults and numbers.

Each schedule is a pure function of `last_batch_iteration` (t below: the last batch trained, -1
before the first `step()`). `step()` advances or sets t and writes each param group's lr into the
optimizer; `state_dict()` holds t alone, as in DeepSpeed. Per-group values ("float or list") are
broadcast or need one entry per group. Any `torch.optim.Optimizer` works, or a wrapper holding one
in `.optimizer` (as DeepSpeed's ZeRO optimizers do).

tests/unit/test_lr_schedules.py pins the numbers to DeepSpeed 0.19.8, quirks included, so that a
DeepSpeed run reproduces step for step: the lr written at construction differs by schedule (0 for
WarmupCosineLR), OneCycle has no `get_last_lr()` before its first step, and OneCycle cycles only
Adam-style `betas`, setting them to `(momentum, 0.99)`.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from shardspeed.config.errors import ConfigError, closest_key, unknown_key_message

logger = logging.getLogger(__name__)

LOG_WARMUP = "log"
LINEAR_WARMUP = "linear"
WARMUP_TYPES = (LOG_WARMUP, LINEAR_WARMUP)

PerGroup = float | Sequence[float]  # one value for all param groups, or one per group


def _torch_optimizer(optimizer: Any) -> Optimizer:
    """The `torch.optim.Optimizer` itself, or the one a wrapper keeps in `.optimizer`."""
    if isinstance(optimizer, Optimizer):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    if isinstance(inner, Optimizer):
        return inner
    raise TypeError(f"{type(optimizer).__name__} is not a torch.optim.Optimizer and wraps none")


def _per_group(optimizer: Optimizer, value: Any, name: str) -> list[Any]:
    """Broadcast a scalar to every param group; check a list has one entry per group."""
    groups = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(f"{name} has {len(value)} values but the optimizer has {groups} param groups")
        return list(value)
    return [value] * groups


def _write_lrs(optimizer: Optimizer, lrs: Sequence[Any]) -> list[Any]:
    """Set each group's lr; a tensor lr (capturable/compiled optimizers) is filled in place."""
    for group, lr in zip(optimizer.param_groups, lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr.squeeze() if torch.is_tensor(lr) else lr)
        else:
            group["lr"] = lr
    return [group["lr"] for group in optimizer.param_groups]


def _positive_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _warmup_type(warmup_type: str) -> str:
    # DeepSpeed falls back to log warmup with a warning rather than failing; the Python API keeps
    # that, while build_lr_scheduler rejects the unknown name outright.
    if warmup_type not in WARMUP_TYPES:
        logger.warning("unknown warmup_type %r; using 'log' warmup", warmup_type)
        return LOG_WARMUP
    return warmup_type


def _warmup_progress(t: int, steps: int, warmup_type: str) -> float:
    """Fraction of warmup done after batch t (< steps): log(t+1)/log(steps), or t/steps."""
    if warmup_type == LOG_WARMUP:
        return (1.0 / math.log(steps)) * math.log(t + 1)
    return t / steps


class _Schedule:
    """The stepping, bookkeeping and checkpoint protocol the five schedules share."""

    optimizer: Optimizer
    last_batch_iteration: int
    _last_lr: list[Any] | None = None
    _unstarted_note: str | None = None  # what get_lr() warns it returns before the first step

    def _lrs(self) -> list[Any]:
        raise NotImplementedError

    def get_lr(self) -> list[Any]:
        """The lr of each param group at `last_batch_iteration`."""
        if self._unstarted_note and self.last_batch_iteration < 0:
            logger.warning("get_lr() called before the schedule's first step; returning %s", self._unstarted_note)
        return self._lrs()

    def get_last_lr(self) -> list[Any]:
        """The lrs last written into the optimizer by this schedule."""
        if self._last_lr is None:
            raise RuntimeError(f"{type(self).__name__}.get_last_lr() needs a step() first")
        return self._last_lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance to the next batch (or jump to `last_batch_iteration`) and apply its lr."""
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _write_lrs(self.optimizer, self._lrs())

    def state_dict(self) -> dict[str, int]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Resume at `sd['last_batch_iteration']`; the next `step()` applies the following lr."""
        self.last_batch_iteration = sd["last_batch_iteration"]


class LRRangeTest(_Schedule):
    """Learning-rate range test: grow the lr from `lr_range_test_min_lr` to find where training diverges.

    lr(t) = min_lr * (1 + step_rate * k), k = (t + 1) / step_size, or floor of it when
    `lr_range_test_staircase`. The optimizer gets min_lr at construction.
    """

    def __init__(self, optimizer: Optimizer, lr_range_test_min_lr: PerGroup = 1e-3,
                 lr_range_test_step_size: int = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False, last_batch_iteration: int = -1) -> None:
        self.optimizer = _torch_optimizer(optimizer)
        self.min_lr = _per_group(self.optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        _positive_int(lr_range_test_step_size, "lr_range_test_step_size")
        self.step_size = lr_range_test_step_size
        self.step_rate = lr_range_test_step_rate
        self.staircase = lr_range_test_staircase
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            self._last_lr = _write_lrs(self.optimizer, self.min_lr)

    def _lrs(self) -> list[Any]:
        intervals = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            intervals = math.floor(intervals)
        growth = 1 + self.step_rate * intervals
        return [lr * growth for lr in self.min_lr]

    def step(self, batch_iteration: int | None = None) -> None:  # DeepSpeed's argument name
        super().step(batch_iteration)


class OneCycle(_Schedule):
    """1Cycle: lr rises min -> max and falls back over one cycle, then optionally decays.

    With b = t + 1, T = first + second step sizes and x = b/T - floor(b/T) (position in the cycle),
    the scale s is x / (first/T) on the way up and (1 - x) / (1 - first/T) on the way down.
    A nonzero stair count for that half holds s on floor(n * steps_into_half / half_size) / n.
    In the cycle (t < T): lr = min_lr + (max_lr - min_lr) * s, momentum = max_mom - (max_mom - min_mom) * s.
    After it, with d = t - T + 1: lr = min_lr / (1 + decay_lr_rate * d / decay_step_size) and
    momentum = max_mom * (1 + decay_mom_rate * d / decay_step_size) (DeepSpeed grows it, unbounded);
    a zero decay_step_size or rate holds min_lr / max_mom instead.
    """

    def __init__(self, optimizer: Optimizer, cycle_min_lr: PerGroup, cycle_max_lr: PerGroup,
                 decay_lr_rate: float = 0.0, cycle_first_step_size: int = 2000,
                 cycle_second_step_size: int | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None, decay_step_size: int = 0,
                 cycle_momentum: bool = True, cycle_min_mom: PerGroup = 0.8, cycle_max_mom: PerGroup = 0.9,
                 decay_mom_rate: float = 0.0, last_batch_iteration: int = -1) -> None:
        self.optimizer = _torch_optimizer(optimizer)
        self.first_step_size = float(cycle_first_step_size)
        second = cycle_first_step_size if cycle_second_step_size is None else cycle_second_step_size
        self.second_step_size = float(second)
        # An empty rising half would divide by zero in the scale; an empty falling half is fine.
        if self.first_step_size <= 0:
            raise ValueError(f"cycle_first_step_size must be positive, got {cycle_first_step_size!r}")
        if self.second_step_size < 0:
            raise ValueError(f"cycle_second_step_size must be non-negative, got {cycle_second_step_size!r}")
        self.total_size = self.first_step_size + self.second_step_size
        self.step_ratio = self.first_step_size / self.total_size
        self.first_stair_count = cycle_first_stair_count
        self.second_stair_count = cycle_first_stair_count if cycle_second_stair_count is None else cycle_second_stair_count
        self.decay_step_size = decay_step_size
        no_decay_interval = math.isclose(decay_step_size, 0)
        self.min_lrs = _per_group(self.optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(self.optimizer, cycle_max_lr, "cycle_max_lr")
        if last_batch_iteration == -1:
            _write_lrs(self.optimizer, self.min_lrs)  # DeepSpeed leaves get_last_lr() unset here
        self.decay_lr_rate = decay_lr_rate
        self.skip_lr_decay = no_decay_interval or math.isclose(decay_lr_rate, 0)
        self.cycle_momentum = cycle_momentum
        self.skip_mom_decay = no_decay_interval
        if cycle_momentum and "betas" not in self.optimizer.defaults:
            # DeepSpeed only drives Adam-style betas; SGD's `momentum` is left untouched.
            logger.warning("cycle_momentum disabled: %s has no betas to cycle", type(self.optimizer).__name__)
            self.cycle_momentum = False
        if self.cycle_momentum:
            self.decay_mom_rate = decay_mom_rate
            # beta2 is pinned to 0.99, whatever the optimizer had, as DeepSpeed does.
            self.min_moms = [(m, 0.99) for m in _per_group(self.optimizer, cycle_min_mom, "cycle_min_mom")]
            self.max_moms = [(m, 0.99) for m in _per_group(self.optimizer, cycle_max_mom, "cycle_max_mom")]
            if last_batch_iteration == -1:
                self._write_betas(self.min_moms)  # the minimum, though the cycle starts at the maximum
            self.skip_mom_decay = self.skip_mom_decay or math.isclose(decay_mom_rate, 0)
        self.last_batch_iteration = last_batch_iteration

    def _scale(self) -> float:
        """Height in the cycle, 0 at min_lr and 1 at max_lr, for the batch after t."""
        batch = self.last_batch_iteration + 1
        x = 1.0 + batch / self.total_size - math.floor(1 + batch / self.total_size)
        rising = x <= self.step_ratio
        scale = x / self.step_ratio if rising else (x - 1) / (self.step_ratio - 1)
        stairs = self.first_stair_count if rising else self.second_stair_count
        if stairs > 0:
            # Stairs are counted from the integer offset in the cycle, not from `scale`: at a
            # half's end the float scale can sit 1e-16 under a stair and floor() would drop it.
            into_cycle = batch % self.total_size
            if into_cycle <= self.first_step_size:
                position = into_cycle * stairs / self.first_step_size
            else:
                position = (self.total_size - into_cycle) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale

    def _decay_intervals(self) -> float:
        return (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size

    def _lrs(self) -> list[Any]:
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return self.min_lrs
        factor = 1 + self.decay_lr_rate * self._decay_intervals()
        return [lo / factor for lo in self.min_lrs]

    def get_mom(self) -> list[tuple[float, float]] | None:
        """The `betas` each group gets at t, or None when momentum is not cycled."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            scale = self._scale()
            return [(hi - (hi - lo) * scale, beta2) for (lo, beta2), (hi, _) in zip(self.min_moms, self.max_moms)]
        if self.skip_mom_decay:
            return self.max_moms
        factor = 1 + self.decay_mom_rate * self._decay_intervals()
        return [(hi * factor, beta2) for hi, beta2 in self.max_moms]

    def _write_betas(self, betas: Sequence[tuple[float, float]]) -> None:
        for group, pair in zip(self.optimizer.param_groups, betas):
            group["betas"] = pair

    def step(self, batch_iteration: int | None = None) -> None:  # DeepSpeed's argument name
        """Advance one batch (or jump to `batch_iteration`) and apply its lr and momentum."""
        super().step(batch_iteration)
        moms = self.get_mom()
        if moms is not None:
            self._write_betas(moms)


class WarmupLR(_Schedule):
    """Warm the lr up from `warmup_min_lr` to `warmup_max_lr`, then hold it.

    lr(t) = min_lr + (max_lr - min_lr) * g(t), with W = max(2, warmup_num_steps) and
    g = log(t + 1) / log(W) ('log') or t / W ('linear') while t < W, else 1.
    `warmup_max_lr=None` takes each group's lr from the optimizer. The optimizer gets min_lr at
    construction, so the first batch trains at min_lr (0 by default).
    """

    _unstarted_note = "warmup_min_lr"

    def __init__(self, optimizer: Optimizer, warmup_min_lr: PerGroup = 0.0, warmup_max_lr: PerGroup | None = None,
                 warmup_num_steps: int = 1000, warmup_type: str = LOG_WARMUP,
                 last_batch_iteration: int = -1) -> None:
        _positive_int(warmup_num_steps, "warmup_num_steps")
        self.optimizer = _torch_optimizer(optimizer)
        if warmup_max_lr is None:
            warmup_max_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.min_lrs = _per_group(self.optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(self.optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [hi - lo for lo, hi in zip(self.min_lrs, self.max_lrs)]
        # log(1) = 0 would divide by zero in the log warmup, so at least two warmup steps.
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = _warmup_type(warmup_type)
        self.last_batch_iteration = last_batch_iteration
        if last_batch_iteration == -1:
            self._last_lr = _write_lrs(self.optimizer, self.min_lrs)

    def _gamma(self) -> float:
        """Fraction of the way from min_lr to max_lr at t (t >= 0)."""
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_progress(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def _lrs(self) -> list[Any]:
        if self.last_batch_iteration < 0:
            return self.min_lrs
        gamma = self._gamma()
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then a linear decay that reaches 0 (that is, warmup_min_lr) at `total_num_steps`.

    After warmup (t >= W): g(t) = max(0, (total - t) / max(1, total - W)). Unlike WarmupLR,
    `warmup_max_lr` defaults to 0.001, as in DeepSpeed.
    """

    def __init__(self, optimizer: Optimizer, total_num_steps: int, warmup_min_lr: PerGroup = 0.0,
                 warmup_max_lr: PerGroup = 0.001, warmup_num_steps: int = 1000, warmup_type: str = LOG_WARMUP,
                 last_batch_iteration: int = -1) -> None:
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)
        if total_num_steps < self.warmup_num_steps:
            logger.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps)

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._gamma()
        remaining = float(self.total_num_steps - self.last_batch_iteration)
        return max(0.0, remaining / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Schedule):
    """Scale each group's own lr by a ratio: warm it up, then follow a half cosine down.

    With base = the group's lr at construction and W = max(2, warmup_num_steps):
    while t < W, ratio = warmup_min_ratio + (1 - warmup_min_ratio) * g(t) (g as in WarmupLR);
    after, p = min(1, (t - W + 1) / max(1, total - W)) and
    ratio = max(0, cos_min_ratio + (1 - cos_min_ratio) * (1 + cos(pi * p)) / 2); lr = base * ratio.
    The optimizer's lr is set to 0 at construction, so the first batch does not learn.
    """

    _unstarted_note = "0"

    def __init__(self, optimizer: Optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = LOG_WARMUP,
                 last_batch_iteration: int = -1) -> None:
        _positive_int(warmup_num_steps, "warmup_num_steps")
        self.optimizer = _torch_optimizer(optimizer)
        self.total_num_steps = total_num_steps
        self.last_batch_iteration = last_batch_iteration
        self.cos_min_ratio = cos_min_ratio
        self.warmup_type = _warmup_type(warmup_type)
        self.warmup_min_ratio = warmup_min_ratio
        self.warmup_num_steps = max(2, warmup_num_steps)
        if total_num_steps < self.warmup_num_steps:
            logger.warning("total_num_steps %s is less than warmup_num_steps %s", total_num_steps, warmup_num_steps)
        # Copied, since the optimizer's lr is overwritten from now on (a tensor lr in place).
        self.org_lrs = [g["lr"].clone() if torch.is_tensor(g["lr"]) else g["lr"] for g in self.optimizer.param_groups]
        if last_batch_iteration == -1:
            self._last_lr = _write_lrs(self.optimizer, [0.0] * len(self.org_lrs))

    def _ratio(self) -> float:
        t = self.last_batch_iteration
        if t < 0:
            return 0.0
        if t < self.warmup_num_steps:
            progress = _warmup_progress(t, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + progress * (1.0 - self.warmup_min_ratio)
        # Clamped so the ratio rests at cos_min_ratio past the end instead of rising again.
        progress = min(1.0, (t - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps))
        half_cosine = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * half_cosine)

    def get_lr_ratio(self) -> float:
        """The multiplier applied to each group's construction-time lr at t."""
        return self._ratio()

    def _lrs(self) -> list[Any]:
        if self.last_batch_iteration < 0:
            return [0.0] * len(self.org_lrs)
        ratio = self._ratio()
        return [lr * ratio for lr in self.org_lrs]


# Each class takes the optimizer and its own keyword parameters (read by build_lr_scheduler).
_SCHEDULERS: dict[str, Callable[..., _Schedule]] = {
    cls.__name__: cls for cls in (LRRangeTest, OneCycle, WarmupLR, WarmupDecayLR, WarmupCosineLR)
}
VALID_SCHEDULERS: tuple[str, ...] = tuple(_SCHEDULERS)
VALID_LR_SCHEDULES: list[str] = list(VALID_SCHEDULERS)  # DeepSpeed's name (accelerate reads it)
"""The `scheduler.type` names a ds_config may use."""


def _config_value(type_name: str, key: str, value: Any, annotation: Any) -> Any:
    """Check one `scheduler.params` value; an integral float (1e3) becomes an int for a step count."""
    where = f"scheduler.params.{key}"
    if isinstance(value, str) and value == "auto":
        raise ConfigError(f"`{where}` is \"auto\" but nothing resolved it; write the number for {type_name}")
    if key == "warmup_type" and value not in WARMUP_TYPES:
        guess = closest_key(str(value), WARMUP_TYPES)
        hint = f" — did you mean {guess!r}?" if guess else ""
        raise ConfigError(f"`{where}` = {value!r} is not one of {list(WARMUP_TYPES)}{hint}")
    # Step counts are the `int` parameters (annotations are strings under `from __future__`).
    if str(annotation).startswith("int") and value is not None and not isinstance(value, bool):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise ConfigError(f"`{where}` must be an integer number of steps, got {value!r}")
    return value


def build_lr_scheduler(type_name: str, params: Mapping[str, Any] | None, optimizer: Any) -> _Schedule:
    """Build the ds_config `scheduler: {type, params}` section's schedule for `optimizer`.

    Raises ConfigError naming `scheduler.type` or `scheduler.params.<key>` (with the closest valid
    name) for an unknown type, an unknown or missing parameter, or a value the schedule rejects.
    """
    cls = _SCHEDULERS.get(type_name)
    if cls is None:
        by_case = {name.lower(): name for name in VALID_SCHEDULERS}
        guess = by_case.get(str(type_name).lower()) or closest_key(str(type_name), VALID_SCHEDULERS)
        hint = f" — did you mean `{guess}`?" if guess else ""
        valid = ", ".join(VALID_SCHEDULERS)
        raise ConfigError(f"unknown `scheduler.type` {type_name!r}{hint} Valid types: {valid}")

    signature = inspect.signature(cls.__init__)
    accepted = [name for name in signature.parameters if name not in ("self", "optimizer")]
    kwargs: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key not in accepted:
            raise ConfigError(f"{unknown_key_message('scheduler.params', key, accepted)} "
                              f"({type_name} takes: {', '.join(accepted)})")
        kwargs[key] = _config_value(type_name, key, value, signature.parameters[key].annotation)
    missing = [name for name in accepted
               if signature.parameters[name].default is inspect.Parameter.empty and name not in kwargs]
    if missing:
        raise ConfigError(f"{type_name} needs `scheduler.params.{missing[0]}`; required: {', '.join(missing)}")
    try:
        return cls(optimizer, **kwargs)
    except ValueError as err:
        raise ConfigError(f"scheduler {type_name}: {err} (in `scheduler.params`)") from err
