"""Profiling (DeepSpeed's `deepspeed.profiling`): the FLOPs profiler (`flops_profiler`), the ZeRO
memory estimators (`memory_estimators`, also under DeepSpeed's `runtime.zero.stage_1_and_2` / `stage3` paths)
and shardspeed's planner (`planner`: which stage, offload and checkpointing fit, and which is fastest)."""
