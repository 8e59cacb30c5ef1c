"""DeepSpeed's module path for activation checkpointing; the implementation is `shardspeed.checkpointing`."""
