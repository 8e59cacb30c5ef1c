"""``deepspeed.ops.adam``: the CPU Adam of ZeRO-Offload and FusedAdam."""
from shardspeed.offload.cpu_optimizers import DeepSpeedCPUAdam, FusedAdam

__all__ = ["DeepSpeedCPUAdam", "FusedAdam"]
