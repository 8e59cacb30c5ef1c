"""DeepSpeed's `deepspeed.profiling.flops_profiler`: the FLOPs profiler and its number formats."""
from .profiler import FlopsProfiler, get_model_profile
from .report import (bytes_to_string, duration_to_string, flops_to_string, macs_to_string, number_to_string,
                     params_to_string)

__all__ = ["FlopsProfiler", "bytes_to_string", "duration_to_string", "flops_to_string", "get_model_profile", "macs_to_string",
           "number_to_string", "params_to_string"]
