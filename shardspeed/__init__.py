"""shardspeed: DeepSpeed-compatible large-model training for PyTorch.

`import shardspeed as deepspeed` is the intended use: the names below are DeepSpeed's. They are
imported on first use, so the command-line launcher starts without loading torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "initialize": "shardspeed.api",
    "add_config_arguments": "shardspeed.api",
    "tp_model_init": "shardspeed.api",
    "init_distributed": "shardspeed.comm.init",
    "ShardspeedEngine": "shardspeed.runtime.engine",
    "PipelineEngine": "shardspeed.pipe",
    "PipelineModule": "shardspeed.pipe",
    "ShardspeedConfig": "shardspeed.config",
    "ConfigError": "shardspeed.config",
    "ProcessTopology": "shardspeed.comm.topology",
    "PipeDataParallelTopology": "shardspeed.comm.topology",
    "PipeModelDataParallelTopology": "shardspeed.comm.topology",
    "init_inference": "shardspeed.inference_api",
    "default_inference_config": "shardspeed.inference_api",
    "InferenceEngine": "shardspeed.inference",
    "DeepSpeedHybridEngine": "shardspeed.runtime.hybrid_engine",
    "OnDevice": "shardspeed.zero",
}
_ALIASES = {"DeepSpeedEngine": "ShardspeedEngine", "DeepSpeedConfig": "ShardspeedConfig"}
# `shardspeed.zero.Init(...)` works after a bare `import shardspeed`, as `deepspeed.zero.Init` does.
_SUBMODULES = {"accelerator", "checkpoint", "checkpointing", "comm", "inference", "launcher", "moe", "ops", "pipe",
               "profiling", "runtime", "tensor_parallel", "utils", "zero"}

__all__ = sorted([*_EXPORTS, *_ALIASES, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"shardspeed.{name}")
    target = _ALIASES.get(name, name)
    if target not in _EXPORTS:
        raise AttributeError(f"module 'shardspeed' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[target]), target)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
