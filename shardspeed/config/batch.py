"""The batch-size triangle: train_batch_size = micro batch x accumulation steps x data-parallel size."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .schema import ShardspeedConfig


def complete_batch_sizes(cfg: "ShardspeedConfig", dp_world_size: int) -> None:
    """Fill the missing batch sizes from the ones given, as DeepSpeed does, then check all three.

    Any two determine the third; `train_batch_size` alone implies one accumulation step, and the
    micro batch alone implies one accumulation step too.
    """
    if dp_world_size < 1:
        raise ConfigError(f"data-parallel world size must be positive, got {dp_world_size}")
    train, micro, gas = cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
    for key, value in (("train_batch_size", train), ("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas)):
        if value is not None and value <= 0:
            raise ConfigError(f"`{key}` must be a positive integer, got {value}")

    if train is not None and micro is not None and gas is None:
        gas = _exact(train, micro * dp_world_size, "gradient_accumulation_steps", train, micro, dp_world_size)
    elif train is not None and gas is not None and micro is None:
        micro = _exact(train, gas * dp_world_size, "train_micro_batch_size_per_gpu", train, gas, dp_world_size)
    elif micro is not None and gas is not None and train is None:
        train = micro * gas * dp_world_size
    elif train is not None and micro is None and gas is None:
        gas = 1
        micro = _exact(train, dp_world_size, "train_micro_batch_size_per_gpu", train, gas, dp_world_size)
    elif micro is not None and train is None and gas is None:
        gas = 1
        train = micro * dp_world_size
    elif train is None and micro is None:
        raise ConfigError(
            "set `train_batch_size` or `train_micro_batch_size_per_gpu` (any two of train_batch_size, "
            "train_micro_batch_size_per_gpu and gradient_accumulation_steps determine the third)"
        )

    assert train is not None and micro is not None and gas is not None
    if train != micro * gas * dp_world_size:
        raise ConfigError(
            "batch sizes disagree: train_batch_size != train_micro_batch_size_per_gpu * gradient_accumulation_steps "
            f"* data-parallel world size: {train} != {micro} * {gas} * {dp_world_size}"
        )
    cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps = train, micro, gas


def _exact(total: int, divisor: int, missing: str, train: int, known: int, world: int) -> int:
    if total % divisor:
        raise ConfigError(
            f"cannot derive `{missing}`: train_batch_size {train} is not divisible by "
            f"{known} * data-parallel world size {world} = {divisor}"
        )
    return total // divisor
