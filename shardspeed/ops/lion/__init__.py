"""``deepspeed.ops.lion``: the CPU Lion of ZeRO-Offload."""
from shardspeed.offload.cpu_optimizers import DeepSpeedCPULion

__all__ = ["DeepSpeedCPULion"]
