"""DeepSpeed's `deepspeed.runtime.sequence_parallel` path: sequence parallelism is not built yet."""
