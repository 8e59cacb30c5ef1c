"""DeepSpeed's `deepspeed.profiling.flops_profiler`: not built yet."""
from .profiler import FlopsProfiler, get_model_profile

__all__ = ["FlopsProfiler", "get_model_profile"]
