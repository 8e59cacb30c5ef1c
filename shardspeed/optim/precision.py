"""What a ZeRO strategy needs to know about numeric precision, in one small object."""
from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import ShardspeedConfig
from .loss_scaler import LossScaler, make_loss_scaler


@dataclass(frozen=True)
class Precision:
    """The loss scaler (a unit scale outside fp16) and whether gradients are checked for inf/nan.

    An overflowing step is skipped on every rank (fp16 always; bf16 unless
    `bf16.check_grad_overflow` is false; fp32 never checks, as in DeepSpeed).
    """

    loss_scaler: LossScaler
    check_overflow: bool

    @classmethod
    def from_config(cls, cfg: ShardspeedConfig, loss_scaler: LossScaler | None = None) -> "Precision":
        check = cfg.fp16.enabled or (cfg.bf16.enabled and cfg.bf16.check_grad_overflow)
        return cls(loss_scaler if loss_scaler is not None else make_loss_scaler(cfg.fp16), check)

    @classmethod
    def fp32(cls) -> "Precision":
        return cls(LossScaler(1.0), False)
