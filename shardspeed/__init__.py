"""shardspeed: DeepSpeed-compatible large-model training for PyTorch.

`import shardspeed as deepspeed` is the intended use: the names below are DeepSpeed's.
"""
from .comm.init import init_distributed
from .comm.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology
from .config import ConfigError, ShardspeedConfig
from .runtime.engine import ShardspeedEngine
from .runtime.initialize import add_config_arguments, initialize

__version__ = "0.1.0"

DeepSpeedEngine = ShardspeedEngine
DeepSpeedConfig = ShardspeedConfig

__all__ = [
    "ConfigError", "DeepSpeedConfig", "DeepSpeedEngine", "PipeDataParallelTopology", "PipeModelDataParallelTopology",
    "ProcessTopology", "ShardspeedConfig", "ShardspeedEngine", "__version__", "add_config_arguments",
    "init_distributed", "initialize",
]
