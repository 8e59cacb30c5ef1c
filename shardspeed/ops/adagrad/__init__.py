"""``deepspeed.ops.adagrad``: the CPU Adagrad of ZeRO-Offload."""
from shardspeed.offload.cpu_optimizers import DeepSpeedCPUAdagrad

__all__ = ["DeepSpeedCPUAdagrad"]
