"""DeepSpeed's ``deepspeed.ops`` names: ``from shardspeed.ops.adam import DeepSpeedCPUAdam`` works as in DeepSpeed.

The classes live in :mod:`shardspeed.offload.cpu_optimizers`; these packages only re-export them.
"""
from shardspeed.ops import adagrad, adam, lion

__all__ = ["adagrad", "adam", "lion"]
