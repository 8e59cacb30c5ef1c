"""Profiling (DeepSpeed's `deepspeed.profiling`): the FLOPs profiler is not built yet."""
