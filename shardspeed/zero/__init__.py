"""ZeRO: how parameters, gradients and optimizer states are partitioned across data-parallel ranks."""
from .base import StepResult, ZeroStrategy
from .factory import build_zero_strategy

__all__ = ["StepResult", "ZeroStrategy", "build_zero_strategy"]
