"""The ds_config schema: typed sections, "auto" resolution, batch-size arithmetic and errors."""
from .errors import ConfigError
from .loader import ParsedConfig, ResolveContext, complete_config, lift_autos, load_config, parse_config, parse_strict, read_config
from .schema import ShardspeedConfig

__all__ = ["ConfigError", "ParsedConfig", "ResolveContext", "ShardspeedConfig", "complete_config", "lift_autos", "load_config",
           "parse_config", "parse_strict", "read_config"]
