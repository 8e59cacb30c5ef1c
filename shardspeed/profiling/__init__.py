"""Profiling (DeepSpeed's `deepspeed.profiling`): the FLOPs profiler (`flops_profiler`) and the ZeRO
memory estimators (`memory_estimators`, also under DeepSpeed's `runtime.zero.stage_1_and_2` / `stage3` paths)."""
