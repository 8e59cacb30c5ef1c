"""fp16 loss scaling with DeepSpeed's rules (static, or dynamic with hysteresis).

Dynamic rules, per optimizer step:
- overflow: if hysteresis is used up (or is 1), halve the scale (not below `min_loss_scale`; already
  at the minimum is an error, as in DeepSpeed); otherwise spend one unit of hysteresis. The step is skipped.
- no overflow: with `consecutive_hysteresis`, refill hysteresis; once `loss_scale_window` clean
  steps have passed since the last overflow (and every window after), double the scale (and refill
  hysteresis).
"""
from __future__ import annotations

from typing import Any

from ..config.sections import FP16Config


class LossScaleAtMinimumError(RuntimeError):
    """fp16 gradients keep overflowing at the smallest allowed scale: training cannot go on."""


class LossScaler:
    """A constant scale: 1.0 for fp32/bf16, or fp16's static `loss_scale`."""

    dynamic = False

    def __init__(self, scale: float = 1.0) -> None:
        self.cur_scale = float(scale)

    @property
    def loss_scale(self) -> float:
        return self.cur_scale

    def update_scale(self, overflow: bool) -> None:
        """A static scale never changes; an overflowing step is still skipped by the caller."""

    def state_dict(self) -> dict[str, Any]:
        return {"cur_scale": self.cur_scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cur_scale = float(state["cur_scale"])


class DynamicLossScaler(LossScaler):
    dynamic = True

    def __init__(
        self,
        init_scale: float = 2.0**16,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_scale: float = 1.0,
        delayed_shift: int = 2,
        consecutive_hysteresis: bool = False,
        raise_error_at_min_scale: bool = True,
    ) -> None:
        super().__init__(init_scale)
        self.scale_factor = scale_factor
        self.scale_window = scale_window
        self.min_scale = min_scale
        self.delayed_shift = delayed_shift
        self.cur_hysteresis = delayed_shift
        self.consecutive_hysteresis = consecutive_hysteresis
        self.raise_error_at_min_scale = raise_error_at_min_scale
        self.cur_iter = 0
        self.last_overflow_iter = -1

    def update_scale(self, overflow: bool) -> None:
        if overflow:
            if self.delayed_shift == 1 or self.cur_hysteresis == 1:
                if self.cur_scale == self.min_scale and self.raise_error_at_min_scale:
                    raise LossScaleAtMinimumError(
                        f"fp16 gradients overflowed with the loss scale already at fp16.min_loss_scale={self.min_scale}; "
                        "training cannot progress. Switch to bf16, lower the learning rate, or check the model for inf/nan."
                    )
                self.cur_scale = max(self.cur_scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.delayed_shift
            # Steps since the last overflow, not counting the current one: the first doubling comes
            # after `scale_window` clean steps have completed (DeepSpeed's count).
            stable = self.cur_iter - self.last_overflow_iter - 1
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.delayed_shift
                self.cur_scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "cur_scale": self.cur_scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cur_scale = float(state["cur_scale"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])
        self.cur_hysteresis = int(state["cur_hysteresis"])


def make_loss_scaler(fp16: FP16Config) -> LossScaler:
    """The scaler the fp16 section describes; a unit scale when fp16 is off."""
    if not fp16.enabled:
        return LossScaler(1.0)
    if fp16.loss_scale != 0:
        return LossScaler(fp16.loss_scale)
    return DynamicLossScaler(
        init_scale=2.0**fp16.initial_scale_power,
        scale_window=fp16.loss_scale_window,
        min_scale=fp16.min_loss_scale,
        delayed_shift=fp16.hysteresis,
        consecutive_hysteresis=fp16.consecutive_hysteresis,
    )
