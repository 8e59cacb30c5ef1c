"""The ds_config schema: typed sections, "auto" resolution, batch-size arithmetic and errors."""
from .errors import ConfigError
from .loader import ResolveContext, lift_autos, load_config, parse_config, read_config, tensor_parallel_size
from .schema import ShardspeedConfig

__all__ = ["ConfigError", "ResolveContext", "ShardspeedConfig", "lift_autos", "load_config", "parse_config", "read_config", "tensor_parallel_size"]
