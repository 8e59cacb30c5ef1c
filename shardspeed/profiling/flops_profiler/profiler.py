"""DeepSpeed's `deepspeed.profiling.flops_profiler.profiler`: not built yet."""
from __future__ import annotations

from ...config.unbuilt import unbuilt_class, unbuilt_function

_FEATURE = "the FLOPs profiler"
FlopsProfiler = unbuilt_class(_FEATURE, "deepspeed.profiling.flops_profiler.FlopsProfiler")
get_model_profile = unbuilt_function(_FEATURE, "deepspeed.profiling.flops_profiler.get_model_profile")
