"""DeepSpeed's `deepspeed.runtime.zero` path: the same objects as `shardspeed.zero`."""
from ...zero import GatheredParameters, Init, register_external_parameter, unregister_external_parameter

__all__ = ["GatheredParameters", "Init", "register_external_parameter", "unregister_external_parameter"]
