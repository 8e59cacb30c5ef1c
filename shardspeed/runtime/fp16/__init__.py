"""DeepSpeed's `deepspeed.runtime.fp16` path."""
