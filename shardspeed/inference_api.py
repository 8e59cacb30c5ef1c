"""`shardspeed.init_inference` (DeepSpeed's signature): a model ready for generation.

Three ways in, as DeepSpeed users know them:
- `init_inference(model, dtype=..., tensor_parallel={"tp_size": N}, replace_with_kernel_inject=...)`:
  the model cast, sharded over N ranks and (with kernel injection) given the fast decode path;
- `init_inference(model, config={"zero": {"stage": 3, "offload_param": {...}}})`: ZeRO-Inference
  (DeepSpeed accepts the `zero` key and ignores it; shardspeed partitions the model as
  `initialize` would, and says so once);
- `initialize(model=..., config={"zero_optimization": {"stage": 3, ...}})` with no optimizer, then
  `engine.module.generate(...)`: DeepSpeed's documented ZeRO-Inference (see `api.initialize`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from .config.errors import ConfigError
from .inference.config import DeepSpeedInferenceConfig, parse_inference_config
from .checkpoint.weights_source import read_checkpoint
from .inference.checkpoint_loading import check_names, load_whole_weights, refuse_without_weights
from .inference.engine import InferenceEngine
from .zero.param_shards import is_partitioned
from .zero.whole_weights import load_state_dict

logger = logging.getLogger("shardspeed")


def init_inference(model: torch.nn.Module, config: Any = None, **kwargs: Any) -> InferenceEngine:
    """Turn `model` into an `InferenceEngine`. `config`: a dict or a JSON file path; keyword arguments are
    merged into it (a key given both ways with different values is an error naming both)."""
    parsed = parse_inference_config(config, **kwargs)
    if parsed.zero and int(parsed.zero.get("stage", 0)) == 3:
        return _zero_inference(model, parsed)
    if parsed.zero and int(parsed.zero.get("stage", 0)) not in (0,):
        raise ConfigError(f"inference config `zero.stage` {parsed.zero.get('stage')}: ZeRO-Inference partitions "
                          "parameters, which is stage 3; use stage 3 or remove the `zero` section")
    return InferenceEngine(model, parsed, weights=_weights(parsed))


def _weights(parsed: DeepSpeedInferenceConfig) -> dict[str, torch.Tensor] | None:
    """The whole weights `checkpoint` names (None without one); relative names resolve against `base_dir`."""
    if parsed.checkpoint is None:
        return None
    return read_checkpoint(parsed.checkpoint, parsed.base_dir or parsed.checkpoint_config.base_dir or "")


def _zero_inference(model: torch.nn.Module, parsed: DeepSpeedInferenceConfig) -> InferenceEngine:
    from .api import initialize

    if parsed.tensor_parallel.tp_size > 1 or parsed.replace_with_kernel_inject:
        raise ConfigError("ZeRO-Inference (`zero.stage` 3) with `tensor_parallel` or `replace_with_kernel_inject` is not "
                          "supported yet by shardspeed; use one of them")
    logger.warning("init_inference: the `zero` section partitions the model with ZeRO-3 (DeepSpeed ignores this key; "
                   "shardspeed does what the guide describes)")
    precision: dict[str, Any] = {}
    if parsed.dtype == torch.float16:
        precision = {"fp16": {"enabled": True}}
    elif parsed.dtype == torch.bfloat16:
        precision = {"bf16": {"enabled": True}}
    state = _weights(parsed)
    partitioned = any(is_partitioned(p) for p in model.parameters())
    if state is None:
        refuse_without_weights(model, partitioned_ok=True)
    elif not partitioned:
        load_whole_weights(model, state)  # built normally or on the meta device: whole, then partitioned below
    engine, *_ = initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "zero_optimization": parsed.zero,
                                                  **precision})
    if state is not None and partitioned:
        check_names(engine.module, state)
        load_state_dict(engine.module, state, strict=False)  # built under zero.Init: into each rank's shards
    return InferenceEngine(engine.module, parsed, zero_engine=engine)


def default_inference_config() -> dict[str, Any]:
    """DeepSpeed's default inference config, as a dict."""
    return DeepSpeedInferenceConfig().model_dump()


__all__ = ["default_inference_config", "init_inference"]
