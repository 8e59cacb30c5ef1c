"""Reading a ds_config (dict, path or JSON string) into a `ShardspeedConfig`, once.

Order: read -> lift out "auto" values -> validate strictly -> resolve the "auto"s the engine can
infer (everything else is rejected, naming the key) -> complete the batch-size triangle.
"""
from __future__ import annotations

import copy
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from .base import StrictModel
from .batch import complete_batch_sizes
from .errors import ConfigError, unknown_key_message
from .schema import UNIMPLEMENTED_SECTIONS, ShardspeedConfig

AUTO = "auto"


@dataclass(frozen=True)
class ResolveContext:
    """What the engine knows that a config's "auto" values may be filled from."""

    dp_world_size: int = 1
    model_dtype: torch.dtype | None = None
    hidden_size: int | None = None
    # Fills "auto" in `zero_optimization.stage` / `.offload_optimizer` (cfg, those keys, dp size) once the batch
    # sizes are complete: the planner, which needs the model, handed in by `initialize` (it sits above config/).
    zero_planner: Callable[[ShardspeedConfig, frozenset[str], int], None] | None = None


def read_config(config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A deep copy of the user's config as a dict, from a dict, a JSON file path or a JSON string."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    if isinstance(config, os.PathLike) or (isinstance(config, str) and not config.lstrip().startswith(("{", "["))):
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file `{path}` does not exist (pass a dict, a path or a JSON string)")
        return _parse_json(path.read_text(), source=f"config file `{path}`")
    if isinstance(config, str):
        return _parse_json(config, source="config JSON string")
    raise ConfigError(f"config must be a dict, a path or a JSON string, not {type(config).__name__}")


def _parse_json(text: str, source: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must hold a JSON object, not {type(value).__name__}")
    return value


def lift_autos(raw: dict[str, Any], prefix: str = "") -> set[str]:
    """Remove every "auto" leaf from `raw` in place; return their dotted keys."""
    autos: set[str] = set()
    for key in list(raw):
        value = raw[key]
        dotted = f"{prefix}{key}"
        if isinstance(value, str) and value.lower() == AUTO:
            autos.add(dotted)
            del raw[key]
        elif isinstance(value, dict):
            autos |= lift_autos(value, prefix=f"{dotted}.")
    return autos


def parse_config(raw: dict[str, Any]) -> ShardspeedConfig:
    """Validate a raw dict (without "auto"s) into typed sections; errors name the dotted key."""
    try:
        return ShardspeedConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def _describe(err: ValidationError) -> str:
    return describe_validation_error(err, ShardspeedConfig, "ds_config")


def describe_validation_error(err: ValidationError, root: type[StrictModel], what: str) -> str:
    """Every problem of a config validated against `root`, each naming its dotted key (an unknown key with
    the closest valid one)."""
    lines = []
    for problem in err.errors():
        loc = [str(part) for part in problem["loc"]]
        if problem["type"] == "extra_forbidden":
            section = _section_at(root, loc[:-1])
            candidates = section.accepted_keys() if section else []
            message = unknown_key_message(".".join(loc[:-1]), loc[-1], candidates)
            if len(loc) > 1 and loc[-1] in root.accepted_keys():
                message += f" (`{loc[-1]}` is a top-level section: move it out of `{'.'.join(loc[:-1])}`)"
            lines.append(message)
        else:
            lines.append(f"config key `{'.'.join(loc)}`: {problem['msg']} (got {problem.get('input')!r})")
    return f"invalid {what}:\n  " + "\n  ".join(lines)


def _section_at(root: type[StrictModel], loc: list[str]) -> type[StrictModel] | None:
    """The model class reached by following `loc` (field names or aliases) from `root`."""
    section: type[StrictModel] | None = root
    for part in loc:
        if section is None:
            return None
        field = next((f for n, f in section.model_fields.items() if part in (n, f.alias)), None)
        section = model_in_annotation(field.annotation) if field else None
    return section


def model_in_annotation(annotation: Any) -> type[StrictModel] | None:
    """The config section class an annotation holds (`X`, `X | None`), or None for plain values."""
    # Every section is a StrictModel (that is what makes unknown keys fail).
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = model_in_annotation(arg)
            if found:
                return found
    return None


def resolve_autos(cfg: ShardspeedConfig, autos: set[str], ctx: ResolveContext) -> None:
    """Fill the "auto" values the engine can infer; reject the rest naming every such key."""
    unresolved = []
    for key in sorted(autos):
        if not _resolve_one(cfg, key, ctx):
            unresolved.append(key)
    if unresolved:
        keys = ", ".join(f"`{k}`" for k in unresolved)
        raise ConfigError(
            f'config keys {keys} are "auto", which shardspeed cannot infer here; write a value. '
            '("auto" is filled for the batch sizes, fp16/bf16.enabled from the model dtype, '
            "zero bucket sizes from the model's hidden_size, scheduler warmup_max_lr from optimizer lr, and "
            "zero_optimization.stage / offload_optimizer by the planner at initialize.)"
        )
    cfg._auto_keys = frozenset(autos)


_BATCH_KEYS = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
_PLANNED = frozenset({"zero_optimization.stage", "zero_optimization.offload_optimizer"})  # by ctx.zero_planner
# Keys whose typed field holds "auto" itself (DeepSpeed's own default value there).
_LITERAL_AUTO = {"pipeline.stages", "data_types.keep_in_fp32_modules"}


def _resolve_one(cfg: ShardspeedConfig, key: str, ctx: ResolveContext) -> bool:
    zero = cfg.zero_optimization
    if key in _BATCH_KEYS:
        return True  # left unset; the batch triangle completes it from the others
    if key in _LITERAL_AUTO:
        return True  # the field's default is "auto" already
    if key in _PLANNED and ctx.zero_planner is not None:
        return True  # planned in complete_config, once the batch sizes are known
    if key in ("fp16.enabled", "bf16.enabled", "bfloat16.enabled") and ctx.model_dtype is not None:
        section = cfg.fp16 if key.startswith("fp16") else cfg.bf16
        section.enabled = ctx.model_dtype == (torch.float16 if key.startswith("fp16") else torch.bfloat16)
        return True
    if key.startswith("zero_optimization.") and ctx.hidden_size:
        h = ctx.hidden_size
        name = key.split(".", 1)[1]
        # The Hugging Face integration's rule of thumb, which DeepSpeed users expect from "auto".
        sizes = {
            "reduce_bucket_size": h * h,
            "stage3_prefetch_bucket_size": int(0.9 * h * h),
            "prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h,
            "param_persistence_threshold": 10 * h,
        }
        if name in sizes:
            setattr(zero, name.removeprefix("stage3_"), sizes[name])
            return True
    if key == "scheduler.params.warmup_max_lr" and cfg.scheduler and cfg.optimizer:
        lr = cfg.optimizer.params.get("lr")
        if isinstance(lr, (int, float)):
            cfg.scheduler.params["warmup_max_lr"] = lr
            return True
    return False


def check_unimplemented(cfg: ShardspeedConfig) -> None:
    """Refuse sections whose feature shardspeed does not have yet, instead of ignoring them."""
    for name in UNIMPLEMENTED_SECTIONS:
        section = getattr(cfg, name)
        # Switched on: `enabled` is true, or (no `enabled` key) some option is set to a true value.
        on = bool(section.get("enabled")) if section and "enabled" in section else any(section.values()) if section else False
        if on:
            raise ConfigError(f"config section `{name}` is not supported yet by shardspeed; remove it or set `{name}.enabled` to false")
    if cfg.fp16.enabled and cfg.bf16.enabled:
        raise ConfigError("`fp16.enabled` and `bf16.enabled` are both true; enable at most one")


@dataclass(frozen=True)
class ParsedConfig:
    """A config validated strictly, its "auto" values not yet resolved (they need the model and the world)."""

    cfg: ShardspeedConfig
    autos: frozenset[str]
    raw: dict[str, Any]  # the config as the user wrote it (what DeepSpeed's `engine.config` returns)


def parse_strict(config: dict[str, Any] | str | os.PathLike[str]) -> ParsedConfig:
    """Read and validate a ds_config: unknown keys, bad values and unsupported sections fail here,
    before anything touches the model or the processes."""
    raw = read_config(config)
    as_written = copy.deepcopy(raw)
    autos = lift_autos(raw)
    cfg = parse_config(raw)
    check_unimplemented(cfg)
    return ParsedConfig(cfg, frozenset(autos), as_written)


def complete_config(parsed: ParsedConfig, ctx: ResolveContext | None = None) -> ShardspeedConfig:
    """Resolve the "auto"s the context allows and complete the batch-size triangle."""
    ctx = ctx or ResolveContext()
    cfg = parsed.cfg
    resolve_autos(cfg, set(parsed.autos), ctx)
    check_unimplemented(cfg)  # "auto" may have switched fp16 or bf16 on
    complete_batch_sizes(cfg, ctx.dp_world_size)
    if parsed.autos & _PLANNED and ctx.zero_planner is not None:
        ctx.zero_planner(cfg, parsed.autos & _PLANNED, ctx.dp_world_size)
    return cfg


def load_config(config: dict[str, Any] | str | os.PathLike[str], ctx: ResolveContext | None = None) -> ShardspeedConfig:
    """Read, validate, resolve and complete a ds_config. This is the only place raw dicts are read."""
    return complete_config(parse_strict(config), ctx)
