"""`"zero_optimization": {"stage": "auto", "offload_optimizer": "auto"}`, resolved by the planner at initialize.

The rule: the lowest stage that fits the memory budget (lower stages communicate less, so they are
faster), keeping the optimizer on the device; only if no stage fits that way, the lowest stage that
fits with the optimizer offloaded to host memory. If nothing fits, the most frugal candidate is
taken and a warning says by how much it is predicted to overflow. A stage or offload the config
writes stays as written; only the "auto" keys are chosen.

The budget is the machine's, per rank: on CUDA the accelerator's memory (less the reserve for its
context) and the node's available host memory shared by its ranks; on a CPU machine the available
host memory divided by the ranks on the node. `zero_optimization.auto_memory_budget` (bytes per
rank) replaces the device budget (on a CPU machine: the host's).

`initialize` does not know the sequence length: it is read from the first sample of
`training_data` when one is given; without it, activations are left out of the prediction (the
log line says so) and the budget should leave room for them.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from ...config.errors import ConfigError
from ...config.schema import ShardspeedConfig
from ...config.sections import OffloadOptimizerConfig
from .hardware import Hardware, format_bytes
from .activations import can_checkpoint
from .parts import Device, Option, Stage
from .predict import Plan, Prediction, plan

logger = logging.getLogger("shardspeed")

STAGE, OFFLOAD = "zero_optimization.stage", "zero_optimization.offload_optimizer"
PLANNED = frozenset({STAGE, OFFLOAD})
ZeroPlanner = Callable[[ShardspeedConfig, frozenset[str], int], None]


def zero_planner(model: torch.nn.Module, training_data: Any = None, model_parallel: bool = False) -> ZeroPlanner:
    """What `initialize` hands the config loader: fills the planned "auto" keys for `model`."""
    def resolve(cfg: ShardspeedConfig, keys: frozenset[str], world: int) -> None:
        if model_parallel:
            raise ConfigError(f"{' and '.join(f'`{k}`' for k in sorted(keys))} \"auto\" plans data-parallel training only; "
                              "with pipeline or tensor parallelism write the stage and offload")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        hardware = Hardware.this_machine(ranks_per_node=local, nodes=max(1, world // local))
        resolve_zero_autos(cfg, keys, model, hardware, sequence_length(training_data))

    return resolve


def resolve_zero_autos(cfg: ShardspeedConfig, keys: frozenset[str], model: torch.nn.Module | Any, hardware: Hardware,
                       seq_len: int | None) -> Prediction:
    """Set `cfg.zero_optimization`'s "auto" stage and/or optimizer offload by the rule above; returns the choice."""
    zero = cfg.zero_optimization
    if zero.auto_memory_budget is not None:
        hardware = hardware.with_budget(zero.auto_memory_budget)
    candidates = _candidates(cfg, keys, _checkpointing(model))
    assert cfg.train_micro_batch_size_per_gpu is not None  # the batch sizes are complete before planning
    found = plan(model, seq_len or 1, cfg.train_micro_batch_size_per_gpu, _precision(cfg), hardware, zero=zero,
                 options=candidates, activation_bytes=None if seq_len else 0)
    chosen = next((p for p in (found.prediction(o) for o in candidates) if p.fits), None)
    taken = chosen or found.prediction(candidates[-1])
    hint = _checkpointing_hint(cfg, model, hardware, seq_len, candidates, taken)
    if STAGE in keys:
        zero.stage = taken.option.stage
    if OFFLOAD in keys:
        device = taken.option.offload_optimizer
        zero.offload_optimizer = OffloadOptimizerConfig(device=device) if device != "none" else None
    _log(found, candidates, chosen, keys, seq_len, zero.auto_memory_budget is not None, hint)
    return taken


def _checkpointing_hint(cfg: ShardspeedConfig, model: Any, hardware: Hardware, seq_len: int | None,
                        candidates: list[Option], taken: Prediction) -> str:
    """When the choice offloads (or nothing fits) and the model could checkpoint but does not: what would
    fit without offload with checkpointing on."""
    if not seq_len or not can_checkpoint(model) or candidates[0].checkpointing or \
            (taken.fits and taken.option.offload_optimizer == "none"):
        return ""
    assert cfg.train_micro_batch_size_per_gpu is not None
    lean = [replace(o, offload_optimizer="none", checkpointing=True) for o in candidates if o.offload_param == "none"]
    lean = list(dict.fromkeys(lean))
    if not lean:
        return ""
    found = plan(model, seq_len, cfg.train_micro_batch_size_per_gpu, _precision(cfg), hardware,
                 zero=cfg.zero_optimization, options=lean)
    fits = next((o for o in lean if found.prediction(o).fits), None)
    return (f" With activation checkpointing on (model.gradient_checkpointing_enable()) {fits.label} would fit "
            "without offload, and run faster." if fits else "")


def _candidates(cfg: ShardspeedConfig, keys: frozenset[str], checkpointing: bool) -> list[Option]:
    """Options in order of preference: stages up without offload, then stages up with the optimizer on the host."""
    zero = cfg.zero_optimization
    param = zero.offload_param.device if zero.offload_param is not None else "none"
    stages: list[Stage] = [3] if param != "none" else [0, 1, 2, 3] if STAGE in keys else [zero.stage]
    written = zero.offload_optimizer.device if zero.offload_optimizer is not None else "none"
    homes: list[Device] = ["none", "cpu"] if OFFLOAD in keys else [written]
    # Stage 0 has no optimizer partition to offload; NVMe parameters need the optimizer offloaded too.
    found = [Option(s, h, param, checkpointing) for h in homes for s in stages
             if not (s == 0 and h != "none") and not (param == "nvme" and h == "none")]
    if not found:
        raise ConfigError(f"`zero_optimization.offload_optimizer` \"{written}\" cannot go with `{STAGE}` 0 or with "
                          f"`offload_param` \"{param}\"; offloading the optimizer needs stage 1 or higher, NVMe parameters "
                          "an offloaded optimizer")
    return found


def _precision(cfg: ShardspeedConfig) -> str:
    return "bf16" if cfg.bf16.enabled else "fp16" if cfg.fp16.enabled else "fp32"


def _checkpointing(model: Any) -> bool:
    """Whether a Hugging Face model has activation checkpointing on (other modules: unknown, taken as off)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def sequence_length(training_data: Any) -> int | None:
    """Tokens per sample of a dataset's first sample (`input_ids`, or its first tensor's last dimension)."""
    if training_data is None:
        return None
    try:
        sample = training_data[0]
    except (TypeError, IndexError, KeyError):
        return None
    if isinstance(sample, dict):
        sample = sample.get("input_ids", next(iter(sample.values()), None))
    if isinstance(sample, (list, tuple)) and sample and isinstance(sample[0], torch.Tensor):
        sample = sample[0]
    if isinstance(sample, torch.Tensor) and sample.dim() > 0:
        return int(sample.shape[-1])
    return None


def _log(found: Plan, candidates: list[Option], chosen: Prediction | None, keys: frozenset[str], seq_len: int | None,
         override: bool, hint: str) -> None:
    hw = found.hardware
    budget = f"{format_bytes(hw.device_budget)} per rank" + (" (zero_optimization.auto_memory_budget)" if override else "")
    if hw.accelerator == "cuda":
        budget += f", host {format_bytes(hw.host_memory)} per node"
    tried = "; ".join(f"{o.label}: {_peak(found.prediction(o), hw)}" for o in candidates)
    acts = f"seq {seq_len}" if seq_len else "activations not counted (no training_data to read the sequence length from)"
    what = ", ".join(f"`{k}`" for k in sorted(keys))
    if chosen is not None:
        logger.info("%s \"auto\" -> %s: the first option predicted to fit the budget %s (%s). Predicted peaks: %s.%s",
                    what, chosen.option.label, budget, acts, tried, hint)
    else:
        logger.warning("%s \"auto\" -> %s: no option is predicted to fit the budget %s (%s); this one needs the least. "
                       "Predicted peaks: %s. Consider offload_optimizer \"auto\", activation checkpointing or a smaller "
                       "micro batch (`shardspeed plan` lists every option).%s", what, candidates[-1].label, budget, acts, tried,
                       hint)


def _peak(p: Prediction, hw: Hardware) -> str:
    text = format_bytes(p.host) if hw.accelerator == "cpu" else \
        f"{format_bytes(p.device)} device, {format_bytes(p.host_node)} host per node"
    return text + ("" if p.fits else " (over)")
