"""ZeRO: how parameters, gradients and optimizer states are partitioned across data-parallel ranks."""
from .base import StepResult, ZeroStrategy
from .factory import build_zero_strategy
from .init_context import GatheredParameters, Init, OnDevice, register_external_parameter, unregister_external_parameter
from .param_shards import ParameterNotGatheredError

__all__ = ["GatheredParameters", "Init", "OnDevice", "ParameterNotGatheredError", "StepResult", "ZeroStrategy", "build_zero_strategy",
           "register_external_parameter", "unregister_external_parameter"]
