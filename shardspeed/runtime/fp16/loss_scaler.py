"""DeepSpeed's `deepspeed.runtime.fp16.loss_scaler` path: the same classes as `shardspeed.optim.loss_scaler`."""
from ...optim.loss_scaler import DynamicLossScaler, LossScaler

__all__ = ["DynamicLossScaler", "LossScaler"]
